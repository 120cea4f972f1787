"""Training curves: `captioner plot RUN` draws RUN/log.jsonl as PNGs; `train --tensorboard` writes the same per-epoch
numbers as TensorBoard scalars.

Both read the epoch records that training writes to log.jsonl (epoch, train_loss, train_bow_loss, val_Bleu_1..4,
lr, images_per_second, ...), so the PNGs, TensorBoard and the log always agree.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from .errors import CaptionerError

TENSORBOARD_DIR = "tensorboard"  # under the run folder

# file name -> (title, y label, [(log key, legend label), ...]); a key absent from the log is left out
CURVES = {
    "train_loss.png": ("Training loss", "loss", [("train_loss", "caption (cross-entropy)"),
                                                  ("train_bow_loss", "bag-of-words (BCE)")]),
    "val_bleu.png": ("Validation BLEU (by decoding)", "BLEU", [(f"val_Bleu_{n}", f"BLEU-{n}") for n in range(1, 5)]),
    "lr.png": ("Learning rate at the end of each epoch", "learning rate", [("lr", "lr")]),
}


def read_log(path: str | Path) -> list[dict]:
    """log.jsonl -> epoch records sorted by epoch. A resumed run may have logged an epoch twice: the last
    record of an epoch wins. Bad input is a CaptionerError naming the file (and line)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise CaptionerError(f"{path}: no such file (a run folder holds log.jsonl after its first epoch)") from None
    except OSError as exc:
        raise CaptionerError(f"cannot read {path}: {exc.strerror or exc}") from None
    by_epoch: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaptionerError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise CaptionerError(f"{path}, line {number}: expected a JSON object with an integer 'epoch'")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise CaptionerError(f"{path}: no epoch records")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plot_curves(records: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per entry of CURVES that the log has data for; returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel, series) in CURVES.items():
        fig = Figure(figsize=(5.5, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = 0
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in records if _is_number(r.get(key))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
                drawn += 1
        if not drawn:
            continue
        if name == "lr.png":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8)
        fig.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)
    if not written:
        raise CaptionerError(f"the log has none of {', '.join(k for _, _, s in CURVES.values() for k, _ in s)}")
    return written


def require_tensorboard():
    """torch's SummaryWriter, or a CaptionerError saying which extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CaptionerError("--tensorboard needs the tensorboard package: pip install 'captioner[tensorboard]'") \
            from None
    return SummaryWriter


def write_epoch_scalars(log_dir: str | Path, record: dict) -> None:
    """Every number of one epoch record as a TensorBoard scalar at step = epoch (tags are the log's keys).

    The writer is opened and closed per epoch: nothing is buffered across epochs, so a killed run loses no
    finished epoch, and a resumed run simply adds events."""
    writer = require_tensorboard()(log_dir=str(log_dir))
    try:
        for key, value in record.items():
            if key != "epoch" and _is_number(value):
                writer.add_scalar(key, value, global_step=record["epoch"])
    finally:
        writer.close()
