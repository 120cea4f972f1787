"""Checkpoints: one self-contained file of plain types and tensors, written atomically, loaded safely.

A checkpoint holds the model weights, the run config, the SentencePiece model bytes, and for resuming the
optimizer/scheduler state, epoch, step, best metric and RNG states. It loads with `weights_only=True`, so a
file from a stranger cannot run code when unpickled.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .atomic import write_atomically
from .errors import CaptionerError, CheckpointError, CheckpointWriteError
from .models.captioner import Captioner
from .text import Tokenizer

FORMAT_VERSION = 1


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add, so any wrapper's weights load."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder: a crash at
    any point leaves either the previous file or the new one, never a torn one.

    The payload is serialised in memory first and then written with plain file writes: torch.save writing
    straight into a file reports a full disk as an opaque RuntimeError from its zip writer, while a plain
    write raises OSError with the real cause (ENOSPC, EFBIG, EROFS, EACCES), which the message then names.
    Any failure raises CheckpointWriteError and leaves `path` as it was.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda handle: handle.write(buffer.getbuffer()), durable=True)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {exc.strerror or exc} (the previous "
                                   f"{path.name}, if any, is intact)") from None


def check_writable_folder(folder: str | Path, what: str = "the run folder") -> Path:
    """Create `folder` and prove a file can be written there, so a read-only or missing location fails at the
    start of a run with a clear message instead of after its first hour of training (or a split's decoding)."""
    folder = Path(folder)
    file_in_the_way = next((f for f in (folder, *folder.parents) if f.exists() and not f.is_dir()), None)
    if file_in_the_way is not None:
        raise CaptionerError(f"cannot write to {what} {folder}: {file_in_the_way} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CaptionerError(f"cannot write to {what} {folder}: {exc.strerror or exc}") from None
    return folder


def check_writable_file(path: str | Path, what: str) -> Path:
    """Create the parent folder of the output file `path` and prove the file can be written there (an existing
    file is opened for appending, so it keeps its content), before the work whose result it will hold."""
    path = Path(path)
    if path.is_dir():
        raise CaptionerError(f"cannot write {what} {path}: it is a folder; give a file name")
    file_in_the_way = next((f for f in path.parents if f.exists() and not f.is_dir()), None)
    if file_in_the_way is not None:
        raise CaptionerError(f"cannot write {what} {path}: {file_in_the_way} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = os.path.lexists(path)  # a link is left as it is, even one whose target is missing
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise CaptionerError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the torn temporary files a killed save_checkpoint left in `folder` (`.NAME.*.tmp`, never read
    by anything). Call it only where no other process is saving into the folder."""
    removed = [p for p in Path(folder).glob(".*.pt.*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Safe load (weights_only=True) with clear errors for missing, corrupt, unsafe and incompatible files."""
    path = Path(path)
    if path.is_dir():
        found = ", ".join(name for name in ("best.pt", "last.pt") if (path / name).is_file())
        raise CheckpointError(f"checkpoint {path} is a folder; give a file in it{f' ({found})' if found else ''}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip format, or its older plain pickle
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint: torch.save writes a zip archive (or "
                              f"a pickle), and this file starts with {magic!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) cannot be loaded safely (weights_only=True refused it, "
            f"or it is truncated or corrupt): {first_line}"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a captioner checkpoint (no 'model'/'config' entries)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this captioner reads {FORMAT_VERSION}")
    return payload


def tokenizer_from_payload(payload: dict[str, Any]) -> Tokenizer:
    return Tokenizer(payload["tokenizer"].numpy().tobytes())


def tokenizer_payload(tokenizer: Tokenizer) -> torch.Tensor:
    """SentencePiece bytes as a uint8 tensor: a plain tensor in the checkpoint, safe under weights_only."""
    return torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Captioner, Tokenizer, RunConfig]:
    """Checkpoint -> (model in eval mode on `device`, tokenizer, run config). Everything comes from the file."""
    model, tokenizer, cfg = model_from_payload(load_checkpoint(path), path)
    return model.to(device).eval(), tokenizer, cfg


def model_from_payload(payload: dict[str, Any], path: str | Path) -> tuple[Captioner, Tokenizer, RunConfig]:
    """A loaded checkpoint (from `path`, named in errors) -> (model on the CPU, tokenizer, run config)."""
    try:
        cfg = RunConfig.from_saved(payload["config"], source=f"checkpoint {path}")
        tokenizer = tokenizer_from_payload(payload)
        model = Captioner(cfg.model, load_encoder_weights=False)
        model.load_state_dict(clean_state_dict(payload["model"]))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} does not match this captioner's model: {exc}") from None
    return model, tokenizer, cfg


# What captioning, evaluation and serving read from a checkpoint; the rest (optimizer, scheduler, RNG states,
# mid-epoch counters, the trained weights beside a moving average) only serves `train --resume`.
INFERENCE_KEYS = ("format_version", "model", "config", "tokenizer", "epoch", "best_metric", "metrics", "history")
FP16_MAX = torch.finfo(torch.float16).max


def _is_training_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint a run wrote (RUN/last.pt, best.pt), which an export must not replace: a
    typo in the destination would cost the run its resumable state. Anything else there may be overwritten."""
    if not path.is_file():
        return False
    try:
        return "optimizer" in load_checkpoint(path)
    except CaptionerError:
        return False


def export_checkpoint(source: str | Path, dest: str | Path, fp16: bool = False) -> dict[str, Any]:
    """Write the inference part of checkpoint `source` to `dest`: the weights (as fp16 with `fp16`, which
    `load_model` turns back into fp32 parameters), the run config, the tokenizer and the epoch's metrics.

    Why: a training checkpoint carries AdamW's two moments per trained weight, three times the size of a model
    whose every weight trains, and a user sharing or serving a model needs none of that. The file is marked
    `exported`, and `train --resume` refuses it by name. A weight beyond fp16's range (65,504) is an error that
    names it, not a silent inf."""
    source, dest = Path(source), Path(dest)
    if dest.exists() and dest.resolve() == source.resolve():
        raise CaptionerError(f"export: {dest} is the checkpoint being exported; give another file")
    if _is_training_checkpoint(dest):
        raise CaptionerError(f"export: {dest} is a training checkpoint (it holds the optimizer state that "
                             "`train --resume` continues from); give another file")
    payload = load_checkpoint(source)
    model_from_payload(payload, source)  # a file that does not build this captioner's model fails here, named
    weights = clean_state_dict(payload["model"])
    if fp16:
        for name, tensor in weights.items():
            if tensor.is_floating_point() and tensor.numel() and bool(tensor.abs().max() > FP16_MAX):
                raise CaptionerError(f"export --fp16: {source}'s weight {name} holds values beyond fp16's range "
                                     f"({float(tensor.abs().max()):.4g} > {FP16_MAX:.0f}); export without --fp16")
        weights = {name: t.half() if t.is_floating_point() else t for name, t in weights.items()}
    else:  # an fp16 export exported again is fp32, as its label says
        weights = {name: t.float() if t.is_floating_point() else t for name, t in weights.items()}
    exported = {key: payload[key] for key in INFERENCE_KEYS if key in payload}
    dtype = "float16" if fp16 else "float32"
    exported["model"] = weights
    exported["exported"] = {"from": str(source), "weights": dtype}
    save_checkpoint(dest, exported)
    return {"out": str(dest), "from": str(source), "weights": dtype, "epoch": payload.get("epoch"),
            "bytes": dest.stat().st_size, "source_bytes": source.stat().st_size}
