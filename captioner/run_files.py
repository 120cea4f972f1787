"""The files of a run folder: last.pt, best.pt, log.jsonl and scst_start.pt, written in an order that survives a
kill at any instant, read back on a resume, and guarded against a new run replacing another run's."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import copy_atomically
from .checkpoint import (clean_state_dict, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                         tokenizer_payload)
from .config import RunConfig
from .curves import TENSORBOARD_DIR
from .distributed import Distributed
from .ema import ModelEMA
from .engine import EpochTotals
from .errors import CaptionerError, CheckpointWriteError
from .text import Tokenizer

log = logging.getLogger(__name__)

SCST_START = "scst_start.pt"  # in the run folder: the checkpoint the self-critical epochs started from
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", SCST_START)  # what a run's epochs write in its folder


def earlier_run_files(out: Path, overwrite: bool, init_from: str = "") -> list[Path]:
    """The files of another run in `out` that this run would replace, or a CaptionerError without `overwrite`.

    A run may not start (or resume into) a folder holding another run's checkpoints: it would replace them epoch
    by epoch (a finished run's best.pt lost to a typo in --out), and until then `evaluate RUN/best.pt` would read
    the old run's. With `overwrite` they are removed, but only once every check has passed and training starts
    (remove_earlier_run). A pre-trained trunk and the feature cache stay: each is checked against this run's
    settings before it is reused."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return []
    names = ", ".join(path.name for path in found)
    if not overwrite:
        resume = f"`captioner train --resume {out / 'last.pt'}` continues it, " if (out / "last.pt") in found else ""
        raise CaptionerError(f"{out} holds another run ({names}): {resume}--overwrite replaces it, or choose another "
                             "--out")
    if init_from and Path(init_from).resolve() in {path.resolve() for path in found}:
        raise CaptionerError(f"--init-from {init_from} is one of the files --overwrite would remove from {out} "
                             f"({names}): copy it elsewhere first, or choose another --out")
    return found


def remove_earlier_run(found: list[Path], out: Path, dist: Distributed) -> None:
    """--overwrite: the earlier run's files (earlier_run_files) and its TensorBoard scalars, by rank 0."""
    if found and dist.is_main:
        for path in found:
            path.unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
        log.info("--overwrite: removed the earlier run's %s from %s", ", ".join(p.name for p in found), out)


def write_log(path: Path, history: list[dict]) -> None:
    """One JSON line per completed epoch, replaced atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def history_before(out: Path, epoch: int) -> list[dict]:
    """Epoch records of a checkpoint written before they were stored in it: the run folder's log, up to `epoch`."""
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= epoch]


class Checkpointer:
    """Writes RUN/last.pt (every epoch, and mid-epoch every `every_steps` batches or `every_minutes`), RUN/best.pt
    and RUN/log.jsonl, in an order that survives a kill at any instant:

    - best.pt before last.pt: if a run dies between them, the resume redoes the epoch from the previous last.pt
      and writes the same best.pt again (the reverse order could leave best.pt one epoch behind for good);
    - log.jsonl is rewritten (atomically) from the epoch records stored in last.pt, so it always matches it:
      after every epoch, and on every resume (a kill between the final last.pt and its log.jsonl leaves the resumed
      run no epoch to train).
    """

    def __init__(self, out: Path, cfg: RunConfig, tokenizer: Tokenizer, steps_per_epoch: int, is_main: bool = True):
        """Only the main process (rank 0) writes; on the others every save is a no-op."""
        self.out, self.cfg, self.tokenizer, self.steps_per_epoch = out, cfg, tokenizer, steps_per_epoch
        self.is_main = is_main
        self.every_steps, self.every_seconds = cfg.train.checkpoint_every, cfg.train.checkpoint_minutes * 60
        self.last_saved = time.monotonic()
        self.ema: ModelEMA | None = None

    def weights(self, model) -> dict[str, Any]:
        """"model" holds the weights to caption with: the moving average when there is one, and then
        "raw_model" the trained weights themselves and "ema_updates" the average's count (what a resume needs)."""
        if self.ema is None:
            return {"model": clean_state_dict(model.state_dict())}
        return {"model": clean_state_dict(self.ema.state_dict()), "raw_model": clean_state_dict(model.state_dict()),
                "ema_updates": self.ema.updates}

    def payload(self, model, optimizer, scheduler, epoch: int, totals: EpochTotals | None, best: float,
                history: list[dict], metrics: dict | None = None) -> dict[str, Any]:
        """`totals` None: `epoch` is complete. Otherwise the run is `totals.batches` batches into `epoch`."""
        return {**self.weights(model), "config": self.cfg.to_dict(),
                "tokenizer": tokenizer_payload(self.tokenizer), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "epoch_batches": 0 if totals is None else totals.batches,
                "epoch_totals": {} if totals is None else asdict(totals),
                "steps_per_epoch": self.steps_per_epoch, "step": scheduler.last_epoch, "best_metric": best,
                "metrics": dict(metrics or {}), "history": list(history), "rng": rng_state()}

    def mid_epoch_due(self, totals: EpochTotals) -> bool:
        if totals.batches >= self.steps_per_epoch:
            return False  # the epoch-end checkpoint follows at once
        by_steps = self.every_steps > 0 and totals.batches % self.every_steps == 0
        by_time = self.every_seconds > 0 and time.monotonic() - self.last_saved >= self.every_seconds
        return by_steps or by_time

    def save_last(self, payload: dict[str, Any]) -> None:
        if self.is_main:
            save_checkpoint(self.out / "last.pt", payload)
        self.last_saved = time.monotonic()

    def save_epoch(self, payload: dict[str, Any], is_best: bool) -> None:
        if not self.is_main:
            return
        if is_best:
            save_checkpoint(self.out / "best.pt", payload)
        self.save_last(payload)
        write_log(self.out / "log.jsonl", payload["history"])


def restore_training_state(payload: dict[str, Any], path: str, model, optimizer, scheduler, steps_per_epoch: int, out: Path,
             ema: ModelEMA | None = None):
    """Load a checkpoint's training state -> (epoch to run next, best metric, epoch records, mid-epoch totals).
    With a moving average, "model" holds it and "raw_model" the trained weights (see Checkpointer.weights)."""
    saved_steps = payload.get("steps_per_epoch", steps_per_epoch)
    if saved_steps != steps_per_epoch:
        raise CaptionerError(f"checkpoint {path} was written with {saved_steps} batches per epoch, but the training "
                             f"set now gives {steps_per_epoch}: the data changed since, or the number of processes "
                             "(an epoch's batches are its images / (processes x --batch-size)), so the run cannot "
                             "resume")
    model.load_state_dict(clean_state_dict(payload.get("raw_model", payload["model"])))
    if ema is not None:
        ema.load(clean_state_dict(payload["model"]), payload.get("ema_updates", 0))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    epoch, batches = payload["epoch"], payload.get("epoch_batches", 0)
    history = list(payload["history"]) if "history" in payload else history_before(out, epoch)
    if batches:  # stopped inside `epoch`: run the rest of it
        log.info("resuming epoch %d at batch %d of %d", epoch, batches, steps_per_epoch)
        return epoch, payload["best_metric"], history, EpochTotals(**payload["epoch_totals"])
    return epoch + 1, payload["best_metric"], history, None


def restore_best_weights(model: nn.Module, ema: ModelEMA | None, history: list[dict], out: Path,
                         folders: list[Path], dist: Distributed) -> None:
    """Load the best epoch's weights into `model`, and into `ema` with a moving average, on every process: where
    self-critical training starts (--scst-start best). They come from RUN/scst_start.pt when an earlier start of
    the phase kept them there, else from best.pt (in `out`, else in the first of `folders`), which is then kept
    as out/scst_start.pt: the first self-critical epoch to improve on it replaces best.pt, and a run killed before
    its last.pt followed must still find where the phase started.

    Cross-entropy epochs after the best one fit the training captions' wording more than the photos (validation
    BLEU-4 drifts down while the loss falls), so sampling from them starts from a worse policy; Rennie et al.
    start from the best cross-entropy model too. The optimizer's moments are kept."""
    best, last = best_epoch(history), (history[-1]["epoch"] if history else 0)
    if best in (0, last):  # the same on every process: each holds the same epoch records
        return
    problem = None
    if dist.is_main:  # reads the file; the others receive the weights (no shared folder needed)
        try:
            source = _load_best_checkpoint(model, ema, history, best, last, out, folders)
            scores = {r["epoch"]: r.get("val_Bleu_4", float("nan")) for r in history}
            log.info("self-critical training starts from epoch %d's weights (%s, validation BLEU-4 %.4f), not from "
                     "the last epoch's (%d, %.4f)", best, source, scores[best], last, scores[last])
        except Exception as exc:  # sent to every process, which would otherwise wait for weights that never come
            problem = f"{exc}" if isinstance(exc, CaptionerError) else f"{type(exc).__name__}: {exc}"
    problem = dist.broadcast(problem)
    if problem:
        raise CaptionerError(problem)
    dist.broadcast_module(model)
    if ema is not None:
        dist.broadcast_module(ema.module)
        ema.updates = dist.broadcast(ema.updates)


def _load_best_checkpoint(model: nn.Module, ema: ModelEMA | None, history: list[dict], best: int, last: int,
                          out: Path, folders: list[Path]) -> Path:
    """Load epoch `best`'s checkpoint (see restore_best_weights) -> the file it came from."""
    score = next(r.get("val_Bleu_4") for r in history if r["epoch"] == best)
    candidates = [out / SCST_START, *(folder / "best.pt" for folder in dict.fromkeys([out, *folders]))]
    looked = []
    for path in candidates:
        if not path.is_file():
            continue
        payload = load_checkpoint(path)
        if payload.get("epoch") == best and payload.get("metrics", {}).get("Bleu_4") == score:
            break
        looked.append(f"{path} holds epoch {payload.get('epoch')}")
    else:
        where = "; ".join(looked) or "no best.pt in " + " or ".join(map(str, dict.fromkeys([out, *folders])))
        raise CaptionerError(f"--scst-start best: the self-critical epochs start from epoch {best}'s weights (its "
                             f"validation BLEU-4 was the best), but no checkpoint holds them ({where}); use "
                             f"--scst-start last to start from epoch {last}'s")
    model.load_state_dict(clean_state_dict(payload.get("raw_model", payload["model"])))
    if ema is not None:
        ema.load(clean_state_dict(payload["model"]), payload.get("ema_updates", 0))
    if path != out / SCST_START:
        try:
            copy_atomically(path, out / SCST_START)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write {out / SCST_START}: {exc.strerror or exc}") from None
    return path


def best_epoch(history: list[dict]) -> int:
    """The first epoch with the highest validation BLEU-4 of `history` (what best.pt holds); 0 if none."""
    scored = [r for r in history if "val_Bleu_4" in r]
    return max(scored, key=lambda r: r["val_Bleu_4"])["epoch"] if scored else 0
