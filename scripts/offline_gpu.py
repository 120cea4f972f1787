"""Runs on a GPU machine that has no network and a fixed time budget: prepare here, run there, read a few files.

A lent or batch-scheduled GPU often comes without package registries, without the dataset, with a cap on what
can be sent to it and with minutes, not hours, to use it. This script splits such a session in two:

    # here, with the network and the data: pack the images, fetch the wheels the GPU machine lacks, check sizes
    python scripts/offline_gpu.py prepare --flickr8k /data/flickr8k

    # there, from the checkout's root (data/flickr8k-128 and .whl/ sent along with it)
    python scripts/offline_gpu.py recipe --out RESULTS --budget 540     # issue-8 style Flickr8k round, scored
    python scripts/offline_gpu.py bench --out RESULTS --budget 540      # training-speed benchmark on CUDA

`recipe` trains a variants file with scripts/ablation.py (all variants at once), then scores the checkpoints with
`captioner bleu-bench` in order of importance while time is left; `bench` runs `captioner benchmark train`
commands in turn. Both keep to `--budget` seconds in all (each phase gets what the later ones leave it; a training
run past its share gets SIGTERM and its best.pt so far is scored) and write at most eight files into `--out`,
rewritten after every phase, so that whatever finished is there even if the machine is taken away mid-run:

    summary.json      the device, versions, each phase's command, seconds and exit status, the best results
    log.txt           everything the phases printed
    results.json/md   (recipe) the ablation's per-variant results, curves included
    bleu_bench.csv    (recipe) every scored (checkpoint, length penalty, n-gram ban) row of every scoring pass
    train_logs.txt    (recipe) the end of each variant's train.log
    bench_*.json      (bench) each benchmark command's JSON

The wheels in .whl/ (nltk and what it needs; pycocotools) are installed with pip into /tmp/site first when the
running Python lacks them, and every phase gets /tmp/site and the checkout on its PYTHONPATH.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")  # where the carried wheels are installed on the GPU machine
WHEELS = ("nltk", "pycocotools", "defusedxml")  # the dependencies a bare PyTorch image lacks (nltk needs defusedxml)
DEFAULT_PACKED = REPO / "data" / "flickr8k-128"
DEFAULT_VARIANTS = REPO / "configs" / "flickr8k_gpu_round7.json"
DEFAULT_BASE = REPO / "configs" / "flickr8k_scratch.json"
MAX_OUT_FILES = 8

# Which bleu-bench passes `recipe` runs, most important first: every variant's best.pt with and without a GNMT
# length penalty and a ban on repeated word pairs (the recipe's decoding is chosen here), then each self-critical
# variant's starting point (its best cross-entropy epoch, RUN/scst_start.pt: the control for what SCST added),
# then ensembles of the variants named in --ensembles.
BEST_DECODING = ["--beam-sizes", "3", "--length-penalties", "0", "1", "--no-repeat-ngrams", "0", "2"]
CONTROL_DECODING = ["--beam-sizes", "3", "--length-penalties", "0", "--no-repeat-ngrams", "0", "2"]

# What a phase is given at least, in seconds: a training phase needs its SIGTERM stop and its dev scoring on top
# of its runs' share (ablation.py allows a minute for the stop in the worst case; it is a few seconds normally).
STOP_AND_SCORE_SECONDS = 45
MIN_PHASE_SECONDS = 20


@dataclass
class Session:
    """The clock, the output folder and the record of the phases run so far."""

    out: Path
    budget: float
    started: float = field(default_factory=time.monotonic)
    phases: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(text + ("" if text.endswith("\n") else "\n"))

    def run(self, name: str, command: list[str], timeout: float, env: dict[str, str]) -> int | None:
        """Runs a phase with its output appended to log.txt; None when it ran out of its time (it was stopped)."""
        self.log(f"\n=== {name} ({timeout:.0f} s at most): {' '.join(command)}")
        started = time.monotonic()
        with open(self.out / "log.txt", "a") as f:
            proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            try:
                code: int | None = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                proc.terminate()  # ablation.py passes it on: every run writes last.pt, scored runs keep best.pt
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                code = None
        seconds = time.monotonic() - started
        self.phases.append({"name": name, "command": command, "seconds": round(seconds, 1),
                            "exit_status": code, "stopped_at_time_limit": code is None})
        self.log(f"=== {name}: {'stopped at its time limit' if code is None else f'exit status {code}'}, "
                 f"{seconds:.0f} s; {self.left():.0f} s of the budget left")
        self.write_summary()
        return code

    def skip(self, name: str, why: str) -> None:
        self.phases.append({"name": name, "skipped": why})
        self.log(f"=== {name}: skipped, {why}")
        self.write_summary()

    def write_summary(self) -> None:
        summary = dict(self.summary, budget_seconds=self.budget,
                       seconds_used=round(time.monotonic() - self.started, 1), phases=self.phases)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace) -> int:
    """Packs Flickr8k at 128 px into the ignored data/ folder, downloads the wheels, and checks what would travel."""
    packed = Path(args.packed)
    if args.flickr8k:
        source = Path(args.flickr8k)
        if not (source / "Flickr8k_text").is_dir():
            raise SystemExit(f"offline_gpu prepare: {source} has no Flickr8k_text/ folder (a Flickr8k root holds "
                             "Flickr8k_text/ and Flicker8k_Dataset/ or Images/)")
        subprocess.run([sys.executable, "-m", "captioner.cli", "pack-images", str(source), str(packed),
                        "--size", str(args.size)], check=True, cwd=REPO, env=child_env())
    if not args.no_wheels:
        wheels = Path(args.wheels)
        wheels.mkdir(parents=True, exist_ok=True)
        platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                 "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"--python-version={args.python_version}", "--implementation=cp", *platforms,
                        "-d", str(wheels), *WHEELS], check=True)
    sizes = travelling_sizes([p for p in (packed, Path(args.wheels)) if p.exists()])
    print(json.dumps(sizes, indent=2))
    if sizes["total_mib"] > args.max_mib:
        print(f"offline_gpu prepare: {sizes['total_mib']} MiB would travel, more than --max-mib {args.max_mib}; "
              "pack smaller (--size) or leave files out", file=sys.stderr)
        return 1
    return 0


def travelling_sizes(carried: list[Path]) -> dict:
    """MiB of the checkout's files (tracked and untracked-not-ignored) and of each carried folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    checkout = sum((REPO / os.fsdecode(name)).stat().st_size for name in listed
                   if name and (REPO / os.fsdecode(name)).is_file())
    folders = {str(p.resolve().relative_to(REPO) if p.resolve().is_relative_to(REPO) else p):
               sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in carried}
    mib = 1 << 20
    return {"checkout_mib": round(checkout / mib, 1), "carried_mib": {k: round(v / mib, 1) for k, v in folders.items()},
            "total_mib": round((checkout + sum(folders.values())) / mib, 1)}


# ---------------------------------------------------------------------------------------------- environment


def child_env() -> dict[str, str]:
    """PYTHONPATH = the checkout, then the installed wheels (if any), then whatever was there."""
    paths = [str(REPO), *([str(SITE)] if SITE.is_dir() else []), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")


def install_wheels(session: Session, wheels: Path) -> None:
    """pip-installs the carried wheels into /tmp/site when the running Python lacks one of their packages."""
    missing = [name for name in ("nltk", "pycocotools") if importlib.util.find_spec(name) is None]
    files = sorted(str(f) for f in wheels.glob("*.whl")) if wheels.is_dir() else []
    if not missing:
        session.summary["wheels"] = "not needed: nltk and pycocotools import here"
        return
    if not files:
        raise SystemExit(f"offline_gpu: {', '.join(missing)} missing and no wheels in {wheels} "
                         "(run `python scripts/offline_gpu.py prepare` where pip can download them)")
    session.run("install wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE), *files],
                timeout=min(120.0, session.left()), env=dict(os.environ))
    session.summary["wheels"] = [Path(f).name for f in files]


def describe_machine(session: Session, env: dict[str, str]) -> None:
    probe = ("import json, os, torch, torchvision; d = torch.cuda.is_available(); print(json.dumps({"
             "'torch': torch.__version__, 'torchvision': torchvision.__version__, 'cuda': d, "
             "'device': torch.cuda.get_device_name(0) if d else 'cpu', "
             "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if d else None, "
             "'cpu_cores': os.cpu_count()}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    try:
        machine = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        machine = {"probe_failed": proc.stderr[-2000:]}
    session.summary.update(machine=machine, python=platform.python_version())
    session.log(f"machine: {json.dumps(machine)}")


def open_session(args: argparse.Namespace) -> tuple[Session, dict[str, str]]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out.iterdir()]
    if stale:
        raise SystemExit(f"offline_gpu: {out} is not empty ({', '.join(p.name for p in stale[:5])}): "
                         "give an empty or new folder, the results of an earlier session must not mix with these")
    session = Session(out, float(args.budget))
    session.summary["command"] = sys.argv
    install_wheels(session, Path(args.wheels))
    env = child_env()
    describe_machine(session, env)
    return session, env


# ----------------------------------------------------------------------------------------------------- recipe


def recipe(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not (root / "Flickr8k_text").is_dir():
        raise SystemExit(f"offline_gpu recipe: {root} has no Flickr8k_text/ folder (run `prepare` first, and send "
                         "its packed folder along)")
    session, env = open_session(args)
    runs = Path(args.runs)
    variants = json.loads(Path(args.variants).read_text())
    session.summary.update(variants_file=str(args.variants), base=str(args.base), variants=variants)

    # Training: every variant at once, each stopped in time for the scoring passes after it.
    train_seconds = session.left() - args.scoring_seconds
    per_run = train_seconds - STOP_AND_SCORE_SECONDS
    if per_run < MIN_PHASE_SECONDS:
        raise SystemExit(f"offline_gpu recipe: a budget of {args.budget} s leaves {per_run:.0f} s per training run "
                         f"after {args.scoring_seconds} s of scoring; give more --budget or less --scoring-seconds")
    ablation = [sys.executable, str(REPO / "scripts" / "ablation.py"), "--dataset-root", str(root), "--out",
                str(runs), "--base", str(args.base), "--variants", str(args.variants), "--parallel",
                str(args.parallel or len(variants)), "--timeout-per-run", f"{per_run:.0f}",
                *(["--device", args.device] if args.device else []), "--", "--workers", str(args.workers),
                *args.train_flags]
    session.run("train and score on dev (scripts/ablation.py)", ablation, train_seconds, env)
    collect_ablation(session, runs)

    # Scoring passes while time is left, most important first.
    for number, (what, entries, decoding) in enumerate(scoring_passes(runs, args.ensembles), 1):
        name = f"bleu-bench {number}: {what}"
        if not entries:
            session.skip(name, "no such checkpoints")
            continue
        if session.left() < MIN_PHASE_SECONDS:
            session.skip(name, f"{session.left():.0f} s left")
            continue
        folder = runs / f"bleu_bench_{number}"
        shutil.rmtree(folder, ignore_errors=True)  # bleu-bench refuses to mix with an earlier benchmark's files
        command = [sys.executable, str(REPO / "scripts" / "bleu_benchmark.py"), "--checkpoints", *entries,
                   *decoding, "--dataset", "flickr8k", "--root", str(root), "--split", "dev", "--out", str(folder),
                   *(["--device", args.device] if args.device else [])]
        session.run(name, command, session.left() - 5, env)
        merge_bleu_bench(session, folder, what)
    session.write_summary()
    return 0


def ranked_variants(runs: Path) -> list[str]:
    """Variants with a dev score, best dev BLEU-4 (beam 3) first."""
    try:
        results = json.loads((runs / "results.json").read_text())["results"]
    except (OSError, json.JSONDecodeError, KeyError):
        return []
    scored = [r for r in results if "dev_beam3" in r]
    return [r["name"] for r in sorted(scored, key=lambda r: -r["dev_beam3"]["Bleu_4"])]


def scoring_passes(runs: Path, ensembles: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """-> [(what, bleu-bench entries, decoding flags)] in the order they run; only checkpoints that exist.

    A variant's scst_start.pt exists only where its self-critical epochs started from an earlier epoch than the
    last cross-entropy one (--scst-start best); where the last was the best, there is no separate control."""
    ranked = ranked_variants(runs)
    members = [[runs / name / "best.pt" for name in names.split("+")] for names in ensembles]
    passes = [("best.pt of each variant", [runs / name / "best.pt" for name in ranked], BEST_DECODING),
              ("scst_start.pt of each self-critical variant (its cross-entropy control)",
               [runs / name / "scst_start.pt" for name in ranked], CONTROL_DECODING),
              ("ensembles", [m for m in members if len(m) > 1], CONTROL_DECODING)]

    def present(entry) -> str | None:
        paths = entry if isinstance(entry, list) else [entry]
        return "+".join(map(str, paths)) if all(p.is_file() for p in paths) else None

    return [(what, [e for e in map(present, entries) if e], decoding) for what, entries, decoding in passes]


def collect_ablation(session: Session, runs: Path) -> None:
    for name in ("results.json", "results.md"):
        if (runs / name).is_file():
            shutil.copyfile(runs / name, session.out / name)
    tails = []
    for log in sorted(runs.glob("*/train.log")):
        tails.append(f"===== {log.parent.name}/train.log (last 3000 characters)\n"
                     + log.read_text(errors="replace")[-3000:])
    if tails:
        (session.out / "train_logs.txt").write_text("\n".join(tails) + "\n")
    ranked = ranked_variants(runs)
    if ranked:
        results = {r["name"]: r for r in json.loads((runs / "results.json").read_text())["results"]}
        best = results[ranked[0]]
        session.summary["best_variant"] = {"name": best["name"], "dev_beam3": best["dev_beam3"],
                                           "train_seconds": best.get("train_seconds"), "status": best["status"]}
    session.write_summary()


def merge_bleu_bench(session: Session, folder: Path, what: str) -> None:
    """Appends a pass's results.csv rows to OUT/bleu_bench.csv, with the pass named in a first column."""
    table = folder / "results.csv"
    if not table.is_file():
        return
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    merged = session.out / "bleu_bench.csv"
    earlier: list[dict] = []
    if merged.is_file():
        with open(merged, newline="") as f:
            earlier = list(csv.DictReader(f))
    rows = earlier + [dict(row, scoring_pass=what) for row in rows]
    columns = ["scoring_pass"] + [c for c in dict.fromkeys(k for row in rows for k in row) if c != "scoring_pass"]
    with open(merged, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    best = max(rows, key=lambda row: float(row.get("Bleu_4") or 0.0))
    session.summary["best_bleu_bench_row"] = best
    session.write_summary()


# ------------------------------------------------------------------------------------------------------ bench


# The training-speed questions, most important first: end to end from JPEG files with the frozen trunk at 224 px
# (the workers' fast path from square copies and nvjpeg), and from cached features, at training's default of two
# captions per image and at COCO's five; then whether compiling or larger batches lift the step; then a whole
# COCO-sized epoch from the cache.
BENCH_COMMON = ["--device", "cuda", "--images", "8192", "--batch-size", "256", "--baseline-batches", "3",
                "--workers", "15", "--pack-size", "224"]
BENCH_RUNS = [
    ("captions2", [*BENCH_COMMON, "--captions-per-image", "2", "--batches", "60", "--rounds", "2", "--only",
                   "loading_from_square_jpeg", "frozen_from_packed_jpeg", "frozen_from_square_jpeg",
                   "frozen_gpu_decode_prefetch_packed", "cached_features"]),
    ("captions5", [*BENCH_COMMON, "--captions-per-image", "5", "--batches", "60", "--rounds", "2", "--only",
                   "frozen_from_square_jpeg", "cached_features"]),
    ("compile_and_batch1024", [*BENCH_COMMON, "--captions-per-image", "2", "--batches", "40", "--compile",
                               "--more-batch-sizes", "1024", "--only", "frozen_from_square_jpeg",
                               "cached_features", "cached_features_compiled", "cached_features_batch1024"]),
    ("coco_epoch", ["--device", "cuda", "--images", "8192", "--batch-size", "256", "--batches", "20",
                    "--baseline-batches", "3", "--workers", "15", "--captions-per-image", "5", "--coco-epoch",
                    "--only", "cached_features"]),
]


def bench_commands(out: Path, only: list[str]) -> list[tuple[str, list[str]]]:
    """-> [(name, command)] of the chosen BENCH_RUNS, each writing OUT/bench_NAME.json."""
    return [(name, [sys.executable, "-m", "captioner.cli", "benchmark", "train", *flags,
                    "--out", str(out / f"bench_{name}.json")])
            for name, flags in BENCH_RUNS if not only or name in only]


def bench(args: argparse.Namespace) -> int:
    session, env = open_session(args)
    for name, command in bench_commands(session.out, args.only):
        if session.left() < args.min_seconds:
            session.skip(f"benchmark {name}", f"{session.left():.0f} s left")
            continue
        session.run(f"benchmark {name}", command, session.left() - 5, env)
    return 0


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("prepare", help="here: pack Flickr8k, download the wheels, check the size that travels")
    q.add_argument("--flickr8k", default="", help="the Flickr8k root to pack (leave out to skip packing)")
    q.add_argument("--packed", default=str(DEFAULT_PACKED), help="where the packed copy goes (default: %(default)s)")
    q.add_argument("--size", type=int, default=128, help="shorter side of the packed images (default: %(default)s)")
    q.add_argument("--wheels", default=str(REPO / ".whl"), help="folder for the wheels (default: %(default)s)")
    q.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: %(default)s)")
    q.add_argument("--no-wheels", action="store_true", help="skip the download")
    q.add_argument("--max-mib", type=float, default=64.0, help="what may travel, in MiB (default: %(default)s)")

    for name, text in (("recipe", "there: train a Flickr8k round and score it within the budget"),
                       ("bench", "there: the CUDA training benchmarks within the budget")):
        r = sub.add_parser(name, help=text)
        r.add_argument("--out", required=True, help="an empty folder for the (at most 8) result files")
        r.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default: %(default)s)")
        r.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels (default: %(default)s)")
        if name == "recipe":
            r.add_argument("--root", default=str(DEFAULT_PACKED), help="Flickr8k root (default: %(default)s)")
            r.add_argument("--runs", default="/tmp/offline_gpu_runs", help="run folders (default: %(default)s)")
            r.add_argument("--base", default=str(DEFAULT_BASE), help="base config (default: %(default)s)")
            r.add_argument("--variants", default=str(DEFAULT_VARIANTS), help="variants file (default: %(default)s)")
            r.add_argument("--parallel", type=int, default=0, help="variants at once (default: all of them)")
            r.add_argument("--workers", type=int, default=2, help="DataLoader workers per run (default: %(default)s)")
            r.add_argument("--device", default="", help="passed to every run (default: each config's, i.e. auto)")
            r.add_argument("--scoring-seconds", type=float, default=80.0,
                           help="kept for the bleu-bench passes after training (default: %(default)s)")
            r.add_argument("--ensembles", nargs="*", default=["pt80_scst3+pt80_scst3_seed1"], metavar="A+B",
                           help="variant names to score as ensembles, joined by + (default: %(default)s)")
            r.add_argument("--train-flags", nargs="*", default=[], metavar="FLAG",
                           help="more flags for every train, e.g. --train-flags=--val-limit=200")
        else:
            r.add_argument("--only", nargs="*", default=[], choices=[n for n, _ in BENCH_RUNS],
                           help="run only these benchmark commands")
            r.add_argument("--min-seconds", type=float, default=60.0,
                           help="start a benchmark command only with this much left (default: %(default)s)")
    args = p.parse_args(argv)
    if getattr(args, "budget", 1) <= 0:
        p.error("--budget must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return {"prepare": prepare, "recipe": recipe, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
