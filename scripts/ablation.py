"""Ablation runner: train a base config and named variants on Flickr8k, K at a time, and score each on dev.

    python scripts/ablation.py --dataset-root /data/flickr8k --out runs/ablation --parallel 8
    python scripts/ablation.py --dataset-root /data/flickr8k --out /tmp/smoke --only sb sb_lr5e-4 \\
        --epochs 1 --device cpu -- --image-size 64 --val-limit 200

A variant is a list of `captioner train` flags applied on top of the base config (`--base`); a `--config FILE`
among them replaces the base instead (FILE relative to the variants file). Each variant runs

    python scripts/train.py --config BASE --dataset flickr8k --root ROOT --out OUT/NAME --no-progress FLAGS...
    python scripts/evaluate.py --checkpoint OUT/NAME/best.pt --dataset flickr8k --root ROOT --split dev \\
        --beam-size 3 --out OUT/NAME/dev_beam3.json

as subprocesses (their output in OUT/NAME/train.log and eval.log), `--parallel K` variants at a time. Variants whose
trunk pre-training (--trunk-pretrain-epochs) is the same share one pre-trained trunk: every train gets
`--trunk-pretrain-cache OUT/pretrained_trunks`, so the first to need it trains it while the others wait, then copy it
(`--separate-pretraining` turns this off). Flags given to this script after `--` go to every `train` after the
variant's own (so they win), then `--epochs` (every variant trains that many) or `--max-epochs` (a variant whose
config asks for more trains that many; one that asks for fewer keeps its own), and `--device`. A variant that fails is
reported with the tail of its log and does not stop the others; one that runs past `--timeout-per-run` seconds gets
SIGTERM (it writes last.pt and stops at the next batch), SIGKILL a minute later, and its best.pt so far is still
evaluated. OUT/results.json (rewritten as each variant ends) holds per variant the flags, dev BLEU-1..4 with beam 3,
best epoch, epochs run, train seconds and device; OUT/results.md and stdout get a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the captioner package of this checkout, installed or not

from captioner.config import TrainConfig  # noqa: E402
DEFAULT_BASE = REPO / "configs" / "flickr8k_seed_baseline.json"
DEFAULT_VARIANTS = REPO / "configs" / "flickr8k_ablation.json"
KILL_GRACE_SECONDS = 60  # after SIGTERM, time to finish the batch and write last.pt
TAIL_CHARS = 2000
SHARED_TRUNKS = "pretrained_trunks"  # OUT/pretrained_trunks: the trunks variants share (train --trunk-pretrain-cache)


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s --dataset-root ROOT --out OUT [options] [-- TRAIN FLAGS...]")
    p.add_argument("--dataset-root", "--root", dest="root", required=True,
                   help="Flickr8k folder (Flickr8k_text/ and the images)")
    p.add_argument("--out", required=True, help="one run folder per variant, results.json, results.md")
    p.add_argument("--base", default=str(DEFAULT_BASE), help="base config (default: %(default)s)")
    p.add_argument("--variants", default=str(DEFAULT_VARIANTS),
                   help="JSON object: variant name -> list of train flags (default: %(default)s)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants, in this order")
    p.add_argument("--parallel", type=int, default=1, help="variants trained at the same time (default: 1)")
    p.add_argument("--device", help="passed to train and evaluate (default: each config's, i.e. auto)")
    p.add_argument("--epochs", type=int, help="passed to every train (overrides the configs)")
    p.add_argument("--max-epochs", type=int, help="cap on each variant's epochs (its config's count if lower)")
    p.add_argument("--timeout-per-run", type=float, default=0.0, metavar="S",
                   help="stop a variant's training after S seconds and evaluate its best.pt so far (0 = none)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N dev images (0 = all)")
    p.add_argument("--skip-done", action="store_true",
                   help="keep the result of a variant whose OUT/NAME/dev_beam3.json exists instead of rerunning it")
    p.add_argument("--separate-pretraining", action="store_true",
                   help=f"each variant pre-trains its own trunk (default: variants whose trunk pre-training is the "
                        f"same share one trunk, trained once, through --trunk-pretrain-cache OUT/{SHARED_TRUNKS})")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    args.extra = extra
    # Absolute in the commands it prints and logs (the runs start where this script did, so relative paths in
    # the flags after `--` and in the variants keep their meaning too)
    args.root, args.out, args.base, args.variants = (os.path.abspath(path) for path in
                                                     (args.root, args.out, args.base, args.variants))
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    return args


def load_variants(path: Path, only: list[str] | None) -> dict[str, list[str]]:
    try:
        variants = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"ablation: cannot read the variants file {path}: {exc}")
    if not isinstance(variants, dict) or not all(
            isinstance(flags, list) and all(isinstance(f, str) for f in flags) for flags in variants.values()):
        raise SystemExit(f"ablation: {path} must be a JSON object of variant name -> list of flag strings")
    if only:
        unknown = [name for name in only if name not in variants]
        if unknown:
            raise SystemExit(f"ablation: unknown variant(s) {unknown}; {path} defines {list(variants)}")
        variants = {name: variants[name] for name in only}
    return variants


def split_config(flags: list[str], base: Path, variants_file: Path) -> tuple[Path, list[str]]:
    """A variant's `--config FILE` (relative to the variants file) replaces the base; the other flags stay."""
    if "--config" not in flags:
        return base, list(flags)
    i = flags.index("--config")
    if i + 1 >= len(flags):
        raise SystemExit(f"ablation: --config without a file in {flags}")
    config = Path(flags[i + 1])
    if not config.is_absolute():
        config = variants_file.parent / config
    return config, flags[:i] + flags[i + 2 :]


def planned_epochs(config: Path, flags: list[str]) -> int:
    """The epochs a variant's config and flags ask for (the last --epochs among its flags wins)."""
    epochs = json.loads(config.read_text()).get("train", {}).get("epochs", TrainConfig.epochs)
    for i, flag in enumerate(flags):
        if flag == "--epochs" and i + 1 < len(flags):
            epochs = int(flags[i + 1])
        elif flag.startswith("--epochs="):
            epochs = int(flag.split("=", 1)[1])
    return epochs


def commands(name: str, config: Path, flags: list[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    run = Path(args.out) / name
    device = ["--device", args.device] if args.device else []
    epochs = args.epochs
    if not epochs and args.max_epochs:
        epochs = min(args.max_epochs, planned_epochs(config, [*flags, *args.extra]))
    shared = [] if args.separate_pretraining else ["--trunk-pretrain-cache", str(Path(args.out) / SHARED_TRUNKS)]
    train = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config), "--dataset", "flickr8k",
             "--root", args.root, "--out", str(run), "--overwrite", "--no-progress", *shared, *flags, *args.extra,
             *(["--epochs", str(epochs)] if epochs else []), *device]
    evaluate = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--checkpoint", str(run / "best.pt"),
                "--dataset", "flickr8k", "--root", args.root, "--split", "dev", "--beam-size", "3",
                "--batch-size", str(args.eval_batch_size), "--out", str(run / "dev_beam3.json"), *device,
                *(["--limit", str(args.eval_limit)] if args.eval_limit else [])]
    return train, evaluate


class Runner:
    """Runs variants' subprocesses, remembers the live ones (so a stop of this script stops them too)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        # Each run gets its share of the cores for its own CPU work (DataLoader workers use one thread each).
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel)))

    def call(self, command: list[str], log: Path, timeout: float) -> tuple[int, float, bool]:
        """-> (exit status, seconds, timed out). Output goes to `log`."""
        started = time.monotonic()
        with open(log, "w") as out:
            with self.lock:
                if self.stopping:
                    return -signal.SIGTERM, 0.0, False
                # in the caller's folder; this checkout's scripts, which import its package (PYTHONPATH above)
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
                self.live.add(proc)
            timed_out = False
            try:
                proc.wait(timeout=timeout or None)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop(proc)
            finally:
                with self.lock:
                    self.live.discard(proc)
        return proc.returncode, time.monotonic() - started, timed_out

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            live = list(self.live)
        for proc in live:
            stop(proc)

    def variant(self, name: str, config: Path, flags: list[str], device: str) -> dict:
        run = Path(self.args.out) / name
        run.mkdir(parents=True, exist_ok=True)
        train, evaluate = commands(name, config, flags, self.args)
        result = {"name": name, "config": str(config), "overrides": flags, "extra": self.args.extra,
                  "device": device, "train_command": train, "eval_command": evaluate}
        code, seconds, timed_out = self.call(train, run / "train.log", self.args.timeout_per_run)
        result.update(train_seconds=round(seconds, 1), train_returncode=code, timed_out=timed_out)
        result.update(read_log(run / "log.jsonl"))
        if code != 0 and not timed_out:
            result["train_log_tail"] = tail(run / "train.log")
        if self.stopping:
            return dict(result, status="stopped (this script was interrupted)")
        if not (run / "best.pt").is_file():
            return dict(result, status="failed" if not timed_out else "timed out before a checkpoint")
        code, seconds, eval_timed_out = self.call(evaluate, run / "eval.log", self.args.timeout_per_run)
        result.update(eval_seconds=round(seconds, 1), eval_returncode=code)
        metrics_file = run / "dev_beam3.json"
        if code not in (0, 1) or eval_timed_out or not metrics_file.is_file():  # 1: some images unreadable
            return dict(result, status="evaluation failed", eval_log_tail=tail(run / "eval.log"))
        result["dev_beam3"] = json.loads(metrics_file.read_text())
        status = "timed out (best.pt so far evaluated)" if timed_out else "ok" if result["train_returncode"] == 0 \
            else "training failed (best.pt so far evaluated)"
        return dict(result, status=status)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (training writes last.pt at the next batch and exits), SIGKILL if it is still there later."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_log(path: Path) -> dict:
    """Best epoch (by validation BLEU-4), epochs run and early stop, from a run's log.jsonl."""
    if not path.is_file():
        return {"epochs_run": 0}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record  # a resumed epoch logged twice counts once
    if not records:
        return {"epochs_run": 0}
    best = max(records.values(), key=lambda r: r.get("val_Bleu_4", float("-inf")))
    return {"epochs_run": len(records), "best_epoch": best["epoch"], "best_val_Bleu_4": best.get("val_Bleu_4"),
            "stopped_early": any(r.get("early_stopped") for r in records.values()),
            "epoch_seconds_mean": round(sum(r.get("epoch_seconds", 0) for r in records.values()) / len(records), 1)}


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-TAIL_CHARS:] if path.is_file() else ""


def device_name(device: str | None) -> str:
    """What the runs train on, in words: the GPU's name, or the CPU's."""
    if device is None or device == "auto" or device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                index = int(device.split(":")[1]) if device and ":" in device else 0
                return torch.cuda.get_device_name(index)
        except Exception:  # no torch here, or a driver problem: the runs themselves will say more
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: list[dict]) -> str:
    lines = ["| variant | flags | dev BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 (beam 3) | best epoch | epochs | train s "
             "| status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("dev_beam3", {})
        flags = " ".join(r.get("overrides", []))
        if r.get("config") != r.get("base"):
            flags = f"--config {Path(r['config']).name} {flags}".strip()
        epochs = f"{r.get('epochs_run', 0)}{' (early stop)' if r.get('stopped_early') else ''}"
        bleu = " | ".join(fmt(m.get(f"Bleu_{n}")) for n in range(1, 5))
        lines.append(f"| {r['name']} | {f'`{flags}`' if flags else '(base)'} | {bleu}"
                     + f" | {fmt(r.get('best_epoch'))} | {epochs} | {fmt(r.get('train_seconds'), 0)} | {r['status']} |")
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM to this script: stop the variants as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    variants_file = Path(args.variants)
    variants = load_variants(variants_file, args.only)
    base = Path(args.base)
    plan = {name: split_config(flags, base, variants_file) for name, flags in variants.items()}
    missing = sorted({str(c) for c, _ in plan.values() if not c.is_file()})
    if missing:
        raise SystemExit(f"ablation: config file(s) not found: {missing}")
    if args.dry_run:
        for name, (config, flags) in plan.items():
            for command in commands(name, config, flags, args):
                print(" ".join(command))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device_name(args.device)
    runner = Runner(args)
    results: dict[str, dict] = {}
    write_lock = threading.Lock()

    def finished(name: str, result: dict) -> None:
        with write_lock:
            results[name] = dict(result, base=str(base))
            ordered = [results[n] for n in plan if n in results]
            (out / "results.json").write_text(json.dumps({"base": str(base), "variants_file": str(variants_file),
                                                          "device": device, "results": ordered}, indent=2) + "\n")
            print(f"[ablation] {name}: {result['status']}"
                  + (f", dev BLEU-4 {result['dev_beam3']['Bleu_4']:.4f}" if "dev_beam3" in result else ""),
                  flush=True)

    def one(name: str) -> None:
        config, flags = plan[name]
        done = out / name / "dev_beam3.json"
        if args.skip_done and done.is_file():
            result = {"name": name, "config": str(config), "overrides": flags, "device": device, "status": "ok (kept)",
                      "dev_beam3": json.loads(done.read_text()), **read_log(out / name / "log.jsonl")}
        else:
            try:
                result = runner.variant(name, config, flags, device)
            except Exception as exc:  # a bug or an OS error in one variant must not lose the others' results
                result = {"name": name, "config": str(config), "overrides": flags, "status": f"runner error: {exc}"}
        finished(name, result)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    print(f"[ablation] {len(plan)} variants, {args.parallel} at a time, on {device}; runs in {out}", flush=True)
    pool = ThreadPoolExecutor(max_workers=args.parallel)
    try:
        for future in [pool.submit(one, name) for name in plan]:
            future.result()
    except KeyboardInterrupt:
        print("[ablation] stopping: every running variant gets SIGTERM (each writes its last.pt)", file=sys.stderr)
        runner.stop_all()
        return 130
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
    ordered = [results[n] for n in plan]
    markdown = table(ordered)
    (out / "results.md").write_text(markdown + "\n")
    print(markdown)
    print(f"[ablation] {len(plan)} variants in {time.monotonic() - started:.0f} s; {out / 'results.json'}")
    for r in ordered:
        for key in ("train_log_tail", "eval_log_tail"):
            if r.get(key):
                print(f"\n[ablation] {r['name']} ({r['status']}), end of its {key.split('_')[0]} log:\n{r[key]}",
                      file=sys.stderr)
    return 0 if all(r["status"].startswith("ok") for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
