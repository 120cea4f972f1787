"""`captioner bleu-bench`: several checkpoints x beam sizes x length penalties (x n-gram bans) on one dataset split.

Each checkpoint encodes the split's images once; every decoding setting then runs from that memory. An entry
`A.pt+B.pt` is the ensemble of A and B (see captioner/ensemble.py), benchmarked like one checkpoint. The output
folder holds everything needed to compare two benchmark runs:

    results.md, results.csv     one row per (checkpoint, beam size, length penalty, n-gram ban): every metric,
                                captions/s
    bleu_vs_beam.png            BLEU-4 (and CIDEr-D) against beam size, one line per checkpoint (and penalty)
    results/<run>.json          the COCO results file of each run
    per_image/<run>.jsonl       per-image captions, references and scores of each run
    report.html                 best and worst captioned images of the best run
    run.json                    versions, seed, device, checkpoint hashes and a hash of the dataset split
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ..checkpoint import check_writable_folder
from ..data.factory import evaluation_loader
from ..decoding import DecodeOptions, decode
from ..engine import Evaluation, autocast_for, encode_split
from ..ensemble import load_models
from ..errors import CaptionerError
from ..flag_types import at_least
from ..report import write_coco_results, write_error_report, write_per_image_scores
from ..scoring import score_captions

TABLE_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L", "METEOR")


def split_hash(records) -> str:
    """Identity of a dataset split: image ids, file names and reference captions, order-independent."""
    digest = hashlib.sha256()
    for r in sorted(records, key=lambda r: str(r.image_id)):
        digest.update(json.dumps([str(r.image_id), Path(r.path).name, list(r.captions)]).encode())
    return digest.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("captioner", "torch", "torchvision", "nltk", "sentencepiece", "pycocoevalcap"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    if out["captioner"] == "not installed":  # run from a source tree without pip install
        from .. import __version__

        out["captioner"] = f"{__version__} (source tree)"
    return out


def ensemble_members(entry: str) -> list[str]:
    """A --checkpoints entry -> the checkpoint files it names: 'A.pt+B.pt' is the ensemble of A.pt and B.pt.
    Paths that hold a '+' themselves are recognised as long as they exist ('runs/a+b/best.pt+runs/c/best.pt' is
    two files when runs/a+b/best.pt is one); otherwise the entry is cut at every '+', and the missing part is what
    the error names."""
    if Path(entry).is_file():
        return [entry]
    members, pending = [], ""
    for part in entry.split("+"):
        pending = f"{pending}+{part}" if pending else part
        if Path(pending).is_file():
            members.append(pending)
            pending = ""
    return members if not pending else entry.split("+")


def _label(path: str) -> str:
    """'RUN_best' for RUN/best.pt, made filesystem-safe."""
    p = Path(path)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem)


def _labels(checkpoints: list[str]) -> list[str]:
    """Short unique names: 'RUN_best' for RUN/best.pt, 'RUNA_best+RUNB_best' for an ensemble entry. Two files
    with the same short name get '-2', '-3' in order of appearance, in ensembles too (a/run/best.pt+b/run/best.pt
    is 'run_best+run_best-2', not a model with itself)."""
    members: dict[str, str] = {}  # checkpoint file -> its short name
    for path in (path for entry in checkpoints for path in ensemble_members(entry)):
        if path not in members:
            members[path] = _unique(_label(path), set(members.values()))
    labels: list[str] = []
    for entry in checkpoints:
        labels.append(_unique("+".join(members[path] for path in ensemble_members(entry)), set(labels)))
    return labels


def _unique(name: str, taken: set[str]) -> str:
    label, n = name, 2
    while label in taken:
        label, n = f"{name}-{n}", n + 1
    return label


def _decode_memory(model, memory: torch.Tensor, tokenizer, options: DecodeOptions, batch_size: int,
                   device: torch.device) -> tuple[list[str], float]:
    """Best caption per memory row, and the seconds decoding took (synchronised on CUDA)."""
    captions, started = [], time.perf_counter()
    for i in range(0, memory.shape[0], batch_size):
        with autocast_for(device):
            hyps = decode(model, memory[i : i + batch_size], options)
        captions += [tokenizer.decode(per_image[0].tokens) for per_image in hyps]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return captions, time.perf_counter() - started


def run_bleu_bench(checkpoints: list[str], beam_sizes: list[int], length_penalties: list[float], records,
                   out_dir: str | Path, device: torch.device, metrics: str = "bleu", batch_size: int = 64,
                   max_len: int = 30, seed: int = 0, dataset_args: dict | None = None,
                   progress: bool = False, no_repeat_ngrams: list[int] | None = None) -> list[dict]:
    """Evaluate every checkpoint x beam size x length penalty x n-gram ban (`no_repeat_ngrams`, default [0]: none);
    write the output folder; return the table rows. A run's name ends in `_nrN` when it bans repeated N-grams."""
    no_repeat_ngrams = no_repeat_ngrams or [0]
    out = Path(out_dir)
    for sub in ("results", "per_image"):
        check_writable_folder(out / sub, "the bleu-bench folder")
    earlier_runs = _runs_listed(out / "results.csv")  # a benchmark run into this folder before
    torch.manual_seed(seed)
    rows, evaluations, tokenization = [], {}, "normalised"
    for checkpoint, label in zip(checkpoints, _labels(checkpoints)):
        model, tokenizer, cfg = load_models(ensemble_members(checkpoint), device)
        loader = evaluation_loader(records, cfg.data.image_size, batch_size)
        memory, ids, references, paths = encode_split(model, loader, device)
        refs_by_id = dict(zip(ids, references))
        for beam in beam_sizes:
            for penalty, no_repeat in itertools.product(length_penalties, no_repeat_ngrams):
                options = DecodeOptions(beam_size=beam, max_len=max_len, length_penalty=penalty, seed=seed,
                                        no_repeat_ngram=no_repeat)
                texts, seconds = _decode_memory(model, memory, tokenizer, options, batch_size, device)
                captions = dict(zip(ids, texts))
                corpus, per_image, skipped = score_captions(refs_by_id, captions, metrics)
                run = f"{label}_beam{beam}_lp{penalty:g}" + (f"_nr{no_repeat}" if no_repeat else "")
                row = {"run": run, "checkpoint": str(checkpoint), "beam_size": beam, "length_penalty": penalty,
                       "no_repeat_ngram": no_repeat,
                       **{k: round(v, 6) for k, v in corpus.items() if isinstance(v, float)},
                       "num_images": len(captions),
                       "captions_per_s": round(len(captions) / max(seconds, 1e-9), 1),
                       "skipped_images": len(loader.dataset.failed_paths)}
                rows.append(row)
                tokenization = corpus.get("tokenization", "normalised")
                if progress:
                    print(f"[bleu-bench] {run}: " + ", ".join(f"{k} {row[k]:.4f}" for k in TABLE_METRICS if k in row),
                          file=sys.stderr, flush=True)
                evaluation = Evaluation(row, captions, refs_by_id, dict(zip(ids, paths)), per_image, skipped)
                evaluations[run] = evaluation
                write_coco_results(out / "results" / f"{run}.json", captions)
                write_per_image_scores(out / "per_image" / f"{run}.jsonl", evaluation)
        del model, memory
    _remove_runs(out, earlier_runs - {row["run"] for row in rows})
    _write_tables(rows, out)
    _plot(rows, out / "bleu_vs_beam.png")
    key = "CIDEr" if all("CIDEr" in row for row in rows) else "Bleu_4"
    best = max(rows, key=lambda r: r[key])
    write_error_report(out / "report.html", evaluations[best["run"]], title=f"bleu-bench best run {best['run']}")
    skipped = _skipped_metrics(evaluations)
    for reason in skipped.values():  # said once, not once per run
        print(f"[bleu-bench] {reason}", file=sys.stderr, flush=True)
    run_info = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
                "seed": seed, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "dataset": dataset_args or {}, "split_hash": split_hash(records), "num_images": len(records),
                "entries": list(checkpoints),
                "checkpoints": {path: file_hash(path) for entry in checkpoints for path in ensemble_members(entry)},
                "beam_sizes": beam_sizes,
                "length_penalties": length_penalties, "no_repeat_ngrams": no_repeat_ngrams, "max_len": max_len,
                "metrics": metrics,
                "tokenization": tokenization,
                "skipped_metrics": skipped, "best_run": best["run"], "ranked_by": key}
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    return rows


def _runs_listed(results_csv: Path) -> set[str]:
    """The run names of the benchmark whose table `results_csv` is (none when there is no such file)."""
    try:
        with open(results_csv, newline="") as f:
            return {row["run"] for row in csv.DictReader(f) if row.get("run")}
    except (OSError, csv.Error, UnicodeDecodeError):
        return set()


def _remove_runs(out: Path, runs: set[str]) -> None:
    """Remove the per-run files of an earlier benchmark's runs that this one did not redo, once this one has
    finished: they would sit beside its runs, described by no table or run.json. Only files of runs the earlier
    results.csv lists are touched."""
    removed = 0
    for run in runs:
        for path in (out / "results" / f"{run}.json", out / "per_image" / f"{run}.jsonl"):
            if path.is_file():
                path.unlink()
                removed += 1
    if removed:
        print(f"[bleu-bench] removed {removed} per-run files of the earlier benchmark in {out}", file=sys.stderr,
              flush=True)


def _skipped_metrics(evaluations: dict[str, Evaluation]) -> dict[str, str]:
    """metric -> why it is missing, over all runs. Usually the same for every run (no Java: no METEOR); a metric
    that failed in some runs only (METEOR timing out once) names them, and their table cells stay empty."""
    runs_by_reason: dict[tuple[str, str], list[str]] = {}
    for run, evaluation in evaluations.items():
        for metric, reason in evaluation.skipped_metrics.items():
            runs_by_reason.setdefault((metric, reason), []).append(run)
    skipped: dict[str, str] = {}
    for (metric, reason), runs in runs_by_reason.items():
        where = "" if len(runs) == len(evaluations) else f" (runs {', '.join(runs)})"
        skipped[metric] = "; ".join(filter(None, [skipped.get(metric), reason + where]))
    return skipped


def _columns(rows: list[dict]) -> list[str]:
    metric_columns = [m for m in TABLE_METRICS if any(m in row for row in rows)]  # missing in some runs: blank
    return ["run", "beam_size", "length_penalty", "no_repeat_ngram", *metric_columns, "captions_per_s", "num_images",
            "checkpoint"]


def _write_tables(rows: list[dict], out: Path) -> None:
    columns = _columns(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, c) for c in columns) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _cell(row: dict, column: str) -> str:
    """A results.md cell: metrics to 4 places; a metric this run lacks (see _skipped_metrics) blank."""
    if column not in row:
        return ""
    return f"{row[column]:.4f}" if column in TABLE_METRICS else str(row[column])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("Bleu_4", "CIDEr") if m in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    several_penalties = len({r["length_penalty"] for r in rows}) > 1
    several_bans = len({r["no_repeat_ngram"] for r in rows}) > 1
    for ax, metric in zip(axes[0], panels):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            name = (r["run"].rsplit("_beam", 1)[0] + (f" lp {r['length_penalty']:g}" if several_penalties else "")
                    + (f" no-repeat {r['no_repeat_ngram']}" if several_bans else ""))
            lines.setdefault(name, []).append((r["beam_size"], r[metric]))
        for name, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xlabel("beam size")
        ax.set_ylabel(metric.replace("Bleu_4", "BLEU-4").replace("CIDEr", "CIDEr-D"))
        ax.set_xticks(sorted({r["beam_size"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="checkpoints to compare; A.pt+B.pt is one entry, the ensemble of A.pt and B.pt")
    p.add_argument("--beam-sizes", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--length-penalties", nargs="+", type=float, default=[0.0])
    p.add_argument("--no-repeat-ngrams", nargs="+", type=int, default=[0],
                   help="n-gram sizes never repeated in a caption, each its own run (0 = no ban)")
    p.add_argument("--metrics", choices=("bleu", "all"), default="bleu")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-len", type=at_least(1), default=30)
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run_from_args(args, records) -> int:
    """`captioner bleu-bench`: `records` is the split its dataset flags name."""
    from ..training import resolve_device

    for checkpoint in (path for entry in args.checkpoints for path in ensemble_members(entry)):
        if not Path(checkpoint).is_file():
            raise CaptionerError(f"bleu-bench: checkpoint {checkpoint} does not exist")
    if any(k < 1 for k in args.beam_sizes):
        raise CaptionerError(f"bleu-bench: beam sizes must be >= 1, got {args.beam_sizes}")
    if not all(penalty >= 0 for penalty in args.length_penalties):  # also refuses nan
        raise CaptionerError(f"bleu-bench: --length-penalties must be >= 0, got {args.length_penalties}")
    if any(n < 0 for n in args.no_repeat_ngrams):
        raise CaptionerError(f"bleu-bench: --no-repeat-ngrams must be >= 0, got {args.no_repeat_ngrams}")
    for flag, values in (("--checkpoints", args.checkpoints), ("--beam-sizes", args.beam_sizes),
                         ("--length-penalties", args.length_penalties), ("--no-repeat-ngrams", args.no_repeat_ngrams)):
        if len(set(values)) < len(values):  # two runs of one name, the second's files over the first's
            raise CaptionerError(f"bleu-bench: {flag} lists a value twice: {' '.join(map(str, values))}")
    used = {"coco": ("captions", "images"), "flickr8k": ("root", "split"),  # the flags that chose the split
            "karpathy": ("karpathy_json", "root", "split")}
    dataset_args = {k: getattr(args, k) for k in ("dataset", *used.get(args.dataset, ()), "limit")}
    rows = run_bleu_bench(args.checkpoints, args.beam_sizes, args.length_penalties, records, args.out,
                          resolve_device(args.device), args.metrics, args.batch_size, args.max_len, args.seed,
                          dataset_args, progress=True, no_repeat_ngrams=args.no_repeat_ngrams)
    print(Path(args.out, "results.md").read_text(), end="")
    print(json.dumps({"out": str(args.out), "runs": len(rows)}))
    return 0
