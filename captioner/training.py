"""`fit(cfg)`: the whole training run — data, vocabulary, model, epochs, validation BLEU, checkpoints, logs.

Run folder: config.json (resolved config), log.jsonl (one JSON line per epoch), last.pt (every epoch),
best.pt (best validation BLEU-4 by real decoding).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .atomic import copy_atomically
from .checkpoint import (check_writable_folder, clean_state_dict, load_checkpoint, remove_stale_temporaries,
                         rng_state, save_checkpoint, set_rng_state, tokenizer_from_payload, tokenizer_payload)
from .config import RunConfig
from .curves import TENSORBOARD_DIR, write_epoch_scalars
from .data.collate import CaptionCollate, stacked_draws
from .data.dataset import CaptionDataset, ignore_stop_signals, stop_workers
from .data.device_augment import DeviceAugmentLoader, augment_batch
from .data.device_decode import DeviceDecodingLoader
from .data.factory import load_records
from .data.sampling import EpochSampler
from .data.transforms import TrainAugment
from .decoding import DecodeOptions
from .distributed import Distributed, init_distributed, shutdown_distributed
from .ema import ModelEMA
from .engine import EpochTotals, NonFiniteLossError, compile_training_forward, evaluate, fill_feature_store, \
    prepare_images, train_one_epoch, warmup_cosine
from .feature_cache import FeatureStore, records_digest, tensors_digest
from .init_from import adopt_checkpoint_model, load_initial_weights
from .errors import CaptionerError, CheckpointWriteError, TrainingInterrupted
from .models.captioner import Captioner
from .shared_trunks import SharedTrunk, stored_settings
from .scst import SelfCriticalBatches, check_scst_settings, make_reward, then_constant
from .text import Tokenizer

log = logging.getLogger(__name__)
PRETRAINED_TRUNK = "trunk_pretrained.pt"  # in the run folder, with --trunk-pretrain-epochs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionerError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def make_optimizer(param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where this torch supports it (CPU and CUDA since torch 2.4):
    on 2 CPU cores the per-parameter loop cost 64 ms a step against 18 ms fused, a tenth of a training step."""
    try:
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without a fused kernel
        return torch.optim.AdamW(param_groups, lr=lr)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def split_records(cfg: RunConfig, split: str):
    d = cfg.data
    captions, images = (d.train_captions, d.train_images) if split == "train" else (d.val_captions, d.val_images)
    return load_records(d.dataset, split, captions=captions, images=images, root=d.root,
                        karpathy_json=d.karpathy_json)


def train_and_val_records(cfg: RunConfig):
    """The run's training records and its validation records (the first --val-limit of them, when set)."""
    train_records, val_records = split_records(cfg, "train"), split_records(cfg, "val")
    return train_records, val_records[: cfg.data.val_limit] if cfg.data.val_limit else val_records


AUGMENT_PLACES = ("auto", "workers", "device")


def make_loader(records, cfg: RunConfig, tokenizer: Tokenizer | None, train: bool, device: torch.device,
                dist: Distributed | None = None):
    """Training batches come in EpochSampler order (a function of seed and epoch, see data/sampling.py).
    The loader's own generator only seeds worker processes, so iterating never touches the global RNG,
    which a resumed run restores for dropout."""
    d, t = cfg.data, cfg.train
    augment = train_augment(cfg) if train else None
    if d.gpu_decode and device.type != "cuda":
        raise CaptionerError(f"--gpu-decode decodes JPEGs with nvjpeg on a CUDA device; this run uses {device}")
    on_device = augment_on_device(d.augment_on, device) and augment is not None  # the setting checked always
    encoded = d.gpu_decode and (augment is None or on_device)
    if d.gpu_decode and not encoded:
        log.warning("--gpu-decode with --augment-on workers: augmented training images are decoded on the CPU "
                    "(augmentation runs there); validation images are decoded on the GPU")
    dataset = CaptionDataset(records, d.image_size, augment=augment, cache_images=d.cache_images and not encoded,
                             strict=d.strict, encoded=encoded, augment_later=on_device)
    collate = CaptionCollate(tokenizer if train else None, cfg.model.max_len, t.captions_per_image)
    dist = dist or Distributed()
    sampler = EpochSampler(len(dataset), t.seed, shuffle=train, rank=dist.rank, world_size=dist.world_size)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=t.workers > 0,
                        generator=torch.Generator().manual_seed(t.seed), worker_init_fn=ignore_stop_signals)
    if encoded:
        loader = DeviceDecodingLoader(loader, device)
    return DeviceAugmentLoader(loader, device) if on_device else loader


def augment_on_device(setting: str, device: torch.device) -> bool:
    """Whether --augment-on SETTING computes the training augmentation on `device` as a batch (auto: on CUDA,
    where it frees the workers' CPU time; on a CPU device the workers already run in parallel with the step)."""
    if setting not in AUGMENT_PLACES:
        raise CaptionerError(f"--augment-on must be one of {', '.join(AUGMENT_PLACES)}, got {setting!r}")
    return setting == "device" or (setting == "auto" and device.type == "cuda")


def train_augment(cfg: RunConfig) -> TrainAugment | None:
    """The training augmentation the data section asks for (None without --augment)."""
    d = cfg.data
    if not d.augment:
        if d.hflip:
            raise CaptionerError("--hflip is an option of --augment: add --augment (or drop --hflip)")
        return None
    try:
        return TrainAugment(d.image_size, (d.augment_scale_min, 1.0), brightness=d.color_jitter,
                            contrast=d.color_jitter, saturation=d.color_jitter, hflip=d.hflip)
    except ValueError as exc:
        raise CaptionerError(f"augmentation settings (--augment-scale-min, --color-jitter): {exc}") from None


def calibrate_frozen_trunk(model, dataset: CaptionDataset, seed: int, device: torch.device, num_images: int = 128,
                           chunk: int = 16) -> None:
    """Measure BatchNorm statistics for the frozen prefix of a randomly initialised trunk (see
    ResNet18Trunk.calibrate_prefix) on the first `num_images` of epoch 0's order, in chunks of `chunk`: the same
    images whatever the batch size or number of processes, so every process (and a single-process run with
    the same global batch) gets identical statistics.

    None of those images readable is an error, raised before the run changes anything in its folder: the
    statistics would stay those of an untouched BatchNorm and the epochs would skip every image anyway."""
    order = EpochSampler(len(dataset), seed).order()[:num_images]
    read = 0

    def batches():
        nonlocal read
        for start in range(0, len(order), chunk):
            items = [item for item in (dataset[i] for i in order[start : start + chunk]) if item is not None]
            read += len(items)
            if items:
                images = torch.stack([item["image"] for item in items])
                draws = stacked_draws(items)  # augmentation that would run on the device (augment_later)
                yield prepare_images(images if draws is None else augment_batch(images, draws), device)

    encoded, dataset.encoded = dataset.encoded, False  # pixels decoded here, whatever the loader does later
    try:
        model.encoder.calibrate_prefix(batches())
    finally:
        dataset.encoded = encoded
    if read == 0:
        raise CaptionerError(f"none of the {len(order)} training images read to calibrate the frozen trunk could be "
                             f"read (the first: {dataset.records[order[0]].path}); see the warnings above")
    log.info("calibrated the frozen trunk's BatchNorm statistics on %d images%s", read,
             f" ({len(order) - read} unreadable, skipped)" if read < len(order) else "")


class TrainStep(nn.Module):
    """`model.forward_train` as a module's forward, which is what DistributedDataParallel wraps and syncs."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.forward_train(*args, **kwargs)


class _Checkpointer:
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


class StopSignals:
    """SIGINT (Ctrl-C) or SIGTERM (what schedulers send before preempting a job) during training: the current
    batch finishes, last.pt is written at that exact point, and the run stops with TrainingInterrupted.
    A second signal goes to the previous handler (Ctrl-C twice still interrupts at once). Only the main
    thread can install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def agreed(self, dist: Distributed, device: torch.device, checkpoint_due: bool = False) -> tuple[bool, bool]:
        """-> (stop, checkpoint): whether any process received a signal, and whether any process finds a
        mid-epoch checkpoint due, by one vote of them all; a process that learns another one received a signal
        takes it as its own. A process must stop on this answer only: acting on its own flag, set by a signal
        that arrived after the vote, it would leave the others waiting in their next collective (DDP's gradient
        all-reduce), and torchrun forwards a SIGTERM to each process at a slightly different moment. A signal
        that misses one vote is counted at the next. The checkpoint is voted on for the same reason: writing one
        sums the epoch's figures over the processes, and `--checkpoint-minutes` reads each process's own clock."""
        stopping, checkpointing = dist.any_each([self.received is not None, checkpoint_due], device)
        if stopping:
            self.received = self.received or signal.SIGTERM
        return stopping, checkpointing

    def raise_if_received(self, where: str, out: Path) -> None:
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise TrainingInterrupted(f"stopped by {name} {where}; {out / 'last.pt'} holds this exact point: continue "
                                      f"with `captioner train --resume {out / 'last.pt'}`", self.received)


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


def _history_before(out: Path, epoch: int) -> list[dict]:
    """Epoch records of a checkpoint written before they were stored in it: the run folder's log, up to `epoch`."""
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= epoch]


def _check_finite_weights(model, epoch: int) -> None:
    """Defence in depth: weights that went NaN/inf (whatever the cause) never reach best.pt or last.pt."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"after epoch {epoch} the weights of {len(bad)} tensors are not finite "
                                 f"(first: {bad[0]}); the previous checkpoints are left as they were")


RESUME_MAY_CHANGE = ("epochs", "out", "device", "checkpoint_every", "checkpoint_minutes", "scst_epochs", "scst_lr",
                     "scst_samples", "scst_reward", "scst_start")
"""The train settings a resumed run takes from `cfg` rather than from its checkpoint: how long, where to write,
which device, how often to checkpoint, and the self-critical epochs after the cross-entropy ones (a finished run
can be given some)."""


def fit(cfg: RunConfig, resume: str | None = None, progress: bool = True, extract_only: bool = False,
        resume_changes: Collection[str] | None = None, typed_model: Collection[str] | None = None,
        overwrite: bool = False) -> dict[str, Any]:
    """Train per `cfg`; with `resume`, continue from that checkpoint (its config wins for model and data).

    On a resume, `cfg` supplies only the RESUME_MAY_CHANGE settings, and with `resume_changes` only those of them
    it names (the device always comes from `cfg`): the command line passes the settings the user gave, so that
    `train --resume RUN/last.pt` alone continues the run as it was set up, in its own folder for its own epochs,
    rather than with the defaults.

    A resumed run continues exactly where the checkpoint left off, mid-epoch included: same data order, same
    caption choices and augmentations, same RNG for dropout; with --deterministic on CPU it ends with the same
    weights, bit for bit, as a run that was never interrupted (tests/test_resume.py kills runs to check it).

    Under torchrun every process runs this; each trains on its share of every batch (DistributedDataParallel),
    decodes its share of the validation split, and rank 0 alone logs and writes the run folder. The checkpoint
    format is the single-process one.

    With cfg.train.init_from (and no `resume`), the new run starts from that checkpoint's model (init_from.py);
    `typed_model` names the model settings typed on the command line, of which it may keep some.

    A run refuses a folder that holds another run's checkpoints, unless `overwrite` (earlier_run_files).
    """
    dist, device_name = init_distributed(cfg.train.device)
    try:
        with ExitStack() as on_exit:
            return _fit(cfg, resume, progress, dist, device_name, on_exit, extract_only, resume_changes,
                        typed_model, overwrite)
    finally:
        shutdown_distributed()


def _fit(cfg: RunConfig, resume: str | None, progress: bool, dist: Distributed, device_name: str,
         on_exit: ExitStack, extract_only: bool = False, resume_changes: Collection[str] | None = None,
         typed_model: Collection[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    if not dist.is_main:
        logging.getLogger("captioner").setLevel(logging.WARNING)
        progress = False
    payload = load_checkpoint(resume) if resume else None
    if payload is not None and "exported" in payload:
        raise CaptionerError(f"{resume} was written by `captioner export` for captioning and evaluation: it holds no "
                             "optimizer state to resume from; resume from the run's last.pt")
    if payload is not None:
        saved = RunConfig.from_saved(payload["config"], source=f"checkpoint {resume}")
        for key in RESUME_MAY_CHANGE:
            if resume_changes is None or key in resume_changes or key == "device":
                setattr(saved.train, key, getattr(cfg.train, key))
        if resume_changes is not None:
            if "out" not in resume_changes:  # the folder the checkpoint is in, wherever the resume is run from
                saved.train.out = str(Path(resume).parent)
            overridden = sorted(key for key in resume_changes if key not in RESUME_MAY_CHANGE
                                and getattr(cfg.train, key) != getattr(saved.train, key))
            if overridden and dist.is_main:
                log.warning("resuming with the run's own %s (a resume keeps them; given: %s)",
                            ", ".join(f"{k}={getattr(saved.train, k)!r}" for k in overridden),
                            ", ".join(f"{k}={getattr(cfg.train, k)!r}" for k in overridden))
        cfg = saved
    cfg.check()
    if payload is None and not extract_only and cfg.train.epochs < 1 and cfg.train.scst_epochs < 1:
        raise CaptionerError(f"--epochs {cfg.train.epochs} with no --scst-epochs: this run would train nothing")
    initial = adopt_checkpoint_model(cfg, typed_model) if payload is None and cfg.train.init_from else None
    out = check_writable_folder(cfg.train.out)
    replaced: list[Path] = []  # another run's files in `out`, removed when training starts (--overwrite)
    if not extract_only and (payload is None or out.resolve() != Path(resume).resolve().parent):
        replaced = earlier_run_files(out, overwrite, cfg.train.init_from if payload is None else "")
    if dist.is_main:
        for stale in remove_stale_temporaries(out):
            log.info("removed %s, a checkpoint write interrupted by an earlier crash", stale)
    device = resolve_device(device_name)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    train_records, val_records = train_and_val_records(cfg)
    if payload is not None or initial is not None:
        tokenizer = tokenizer_from_payload(payload if payload is not None else initial)
    else:  # trained once, by rank 0, and sent to the others
        trained = None
        if dist.is_main:
            trained = Tokenizer.train((c for r in train_records for c in r.captions), cfg.train.vocab_size).model_bytes
        tokenizer = Tokenizer(dist.broadcast(trained))
        cfg.model.vocab_size = tokenizer.vocab_size
    # The trunk's starting weights: the config's, or with --trunk-pretrain-epochs RUN/trunk_pretrained.pt (the
    # config keeps describing the recipe, so `train --config RUN/config.json --overwrite` reuses that file)
    start_weights = cfg.model.encoder_weights
    if payload is None and cfg.train.trunk_pretrain_epochs > 0:
        start_weights = str(pretrained_trunk(cfg, train_records, val_records, out, device, progress, dist))
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # the same start whether it was trained or reused
    log.info("train %d images, val %d images, vocabulary %d, device %s%s", len(train_records), len(val_records),
             tokenizer.vocab_size, device, f", {dist.world_size} processes" if dist.enabled else "")

    try:
        model = Captioner(replace(cfg.model, encoder_weights=start_weights),
                          load_encoder_weights=payload is None and initial is None)
    except ValueError as exc:  # inconsistent model settings, e.g. --trainable-layers beyond --trunk-stages
        raise CaptionerError(f"model settings: {exc}") from None
    initialised = initial is not None
    if initialised:
        load_initial_weights(model, initial, cfg.train.init_from)
    initial = None  # the weights are in the model: the checkpoint (perhaps with AdamW's moments) is let go
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    train_loader = make_loader(train_records, cfg, tokenizer, train=True, device=device, dist=dist)
    val_loader = make_loader(val_records, cfg, None, train=False, device=device, dist=dist)
    on_exit.callback(stop_workers, train_loader, val_loader)  # however the run ends (see stop_workers)
    sampler: EpochSampler = train_loader.sampler
    t = cfg.train
    optimizer = make_optimizer(model.param_groups(t.lr, t.encoder_lr, t.weight_decay), t.lr)
    steps_per_epoch = math.ceil(sampler.per_process / t.batch_size)  # batches; updates: / accumulate
    updates_per_epoch = math.ceil(steps_per_epoch / t.accumulate)
    check_scst_settings(t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, then_constant(
        warmup_cosine(t.epochs * updates_per_epoch, max(1, int(t.warmup_epochs * updates_per_epoch))),
        t.epochs * updates_per_epoch, t.scst_lr / t.lr if t.scst_epochs else 0.0))
    checkpointer = _Checkpointer(out, cfg, tokenizer, steps_per_epoch, is_main=dist.is_main)

    if payload is None and not initialised and start_weights == "none" and model.encoder.has_frozen_prefix:
        calibrate_frozen_trunk(model, train_loader.dataset, t.seed, device)
    ema = checkpointer.ema = ModelEMA(model, t.ema_decay) if t.ema_decay > 0 else None
    start_epoch, best, history, totals = 1, float("-inf"), [], None
    if payload is not None:
        start_epoch, best, history, totals = _restore(payload, resume, model, optimizer, scheduler, steps_per_epoch,
                                                      out, ema)
        if totals is not None and not dist.is_main:  # the saved sums are the whole run's: rank 0 carries them on
            totals = totals.position_only()
    remove_earlier_run(replaced, out, dist)  # the checks passed: nothing is lost to a run that cannot start
    if dist.is_main:  # and with them, the earlier run's config.json describes its checkpoints until here
        cfg.save(out / "config.json")
    if payload is not None and dist.is_main:  # a kill between last.pt and log.jsonl at the final epoch leaves
        write_log(out / "log.jsonl", history)  # no epoch to rewrite it

    stores = attach_feature_stores(cfg, model, {"train": train_loader, "val": val_loader}, out, device, dist)
    if extract_only:
        return _extract(model, {"train": train_loader, "val": val_loader}, stores, device, dist, progress)
    forward = None
    if dist.enabled:  # after the checkpoint is restored: DDP sends rank 0's weights and buffers to all at start
        device_ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(TrainStep(model), device_ids=device_ids)
    if t.compile:  # the training forward only; decoding steps stay eager (their shapes change every step)
        forward = compile_training_forward(forward or model.forward_train)
    val_options = DecodeOptions(beam_size=t.val_beam_size, max_len=cfg.model.max_len)
    reward = make_reward(t.scst_reward, [r.captions for r in train_records]) if t.scst_epochs else None
    cross_entropy_end = cross_entropy_epochs(history, t.epochs)  # fewer than --epochs after an early stop
    if resume and start_epoch > cross_entropy_end + t.scst_epochs and dist.is_main:
        log.info("%s has no epoch left to train (cross-entropy epochs: %d%s, self-critical: %d)", resume,
                 cross_entropy_end, ", stopped early" if cross_entropy_end < t.epochs else "", t.scst_epochs)
    with StopSignals() as stop:
        epoch = start_epoch
        while epoch <= cross_entropy_end + t.scst_epochs:
            started = time.time()
            totals = totals or EpochTotals()
            images_before = totals.images  # a resumed epoch's images before the stop: not timed in this process
            sampler.set_epoch(epoch, start=min(totals.batches * t.batch_size, sampler.per_process))
            self_critical = epoch > cross_entropy_end  # the cross-entropy epochs are done: sample, score, reinforce
            batches = train_loader
            if self_critical and epoch == cross_entropy_end + 1 and totals.batches == 0:  # the phase starts
                skip_to_update(scheduler, max(scheduler.last_epoch, t.epochs * updates_per_epoch))  # --scst-lr
                if t.scst_start == "best":
                    restore_best_weights(model, ema, history, out, [Path(resume).parent] if resume else [], dist)
            if self_critical:
                batches = SelfCriticalBatches(train_loader, model, tokenizer, device, t.scst_samples,
                                              cfg.model.max_len, t.seed, epoch, totals, stores.get("train"), reward)

            def after_batch(so_far: EpochTotals, epoch: int = epoch) -> None:
                # All processes stop, and checkpoint, together at the same batch.
                stopping, checkpointing = stop.agreed(dist, device, checkpointer.mid_epoch_due(so_far))
                if stopping or checkpointing:  # the checkpoint holds the whole run's figures, not rank 0's share
                    everyone = _summed_over_processes(so_far, dist, device) if dist.enabled else so_far
                    checkpointer.save_last(checkpointer.payload(model, optimizer, scheduler, epoch, everyone, best,
                                                                history))
                if stopping:
                    stop.raise_if_received(f"at epoch {epoch}, batch {so_far.batches} of {steps_per_epoch}", out)

            stats = train_one_epoch(model, batches, optimizer, scheduler, device, epoch, t.label_smoothing,
                                    t.clip_grad, progress, stores.get("train"), totals=totals, on_batch=after_batch,
                                    nonfinite=t.on_nonfinite, forward=forward, dist=dist, accumulate=t.accumulate,
                                    ema=ema, cpu_bf16=t.cpu_bf16)
            if dist.enabled:  # the whole run's figures, not rank 0's share
                stats = _summed_over_processes(totals, dist, device).summary()
                images_before = int(dist.sum([images_before], device)[0])
            totals = None
            train_seconds = time.time() - started
            if stats["images"] == 0 and stats["skipped_images"] > 0:  # e.g. a wrong folder: nothing was learnt
                raise CaptionerError(f"epoch {epoch}: no training image could be read ({stats['skipped_images']} "
                                     "skipped; the warnings above name each file and why), so nothing was trained")
            _check_finite_weights(model, epoch)
            if ema is not None:
                ema.broadcast_from_main(dist)  # every process decodes its share with rank 0's average
            evaluation = evaluate(model if ema is None else ema.module, val_loader, tokenizer, device, val_options,
                                  progress=progress, dist=dist, feature_store=stores.get("val"))
            for store in stores.values():
                store.flush()
            metrics, captions = evaluation.metrics, evaluation.captions
            record = {"epoch": epoch, "phase": "scst" if self_critical else "cross_entropy", **stats,
                      **{f"val_{k}": v for k, v in metrics.items()},
                      "lr": scheduler.get_last_lr()[-1], "train_seconds": round(train_seconds, 2),
                      "images_per_second": round((stats["images"] - images_before) / max(train_seconds, 1e-9), 2),
                      "epoch_seconds": round(time.time() - started, 2),
                      "example": next(iter(captions.values()))}
            is_best = metrics["Bleu_4"] > best
            best = max(best, metrics["Bleu_4"])
            history.append(record)
            stale = epoch - best_epoch(history)  # epochs since validation BLEU-4 last improved
            stopping_early = 0 < t.early_stop_patience <= stale and epoch < cross_entropy_end
            if stopping_early:  # in the record before it is saved: last.pt and log.jsonl say why the phase ended
                record["early_stopped"] = True
                cross_entropy_end = epoch  # the self-critical epochs, if any, follow at once
            checkpointer.save_epoch(checkpointer.payload(model, optimizer, scheduler, epoch, None, best, history,
                                                         metrics), is_best)
            log.info("epoch %d: loss %.4f, val BLEU-4 %.4f%s, %.1f img/s, e.g. %r", epoch, stats["train_loss"],
                     metrics["Bleu_4"], " (best)" if is_best else "", record["images_per_second"],
                     record["example"])
            if t.tensorboard and dist.rank == 0:
                write_epoch_scalars(out / TENSORBOARD_DIR, record)
            if stop.agreed(dist, device)[0]:
                stop.raise_if_received(f"after epoch {epoch}", out)
            if stopping_early:
                log.info("early stop after epoch %d of %d: validation BLEU-4 has not improved for %d epochs "
                         "(--early-stop-patience %d); best.pt holds epoch %d%s", epoch, t.epochs, stale,
                         t.early_stop_patience, best_epoch(history),
                         f"; {t.scst_epochs} self-critical epochs follow" if t.scst_epochs else "")
            epoch += 1
    return {"out": str(out), "best_bleu_4": best, "best_epoch": best_epoch(history), "epochs_run": len(history),
            "stopped_early": any(r.get("early_stopped") for r in history), "history": history,
            "rank": dist.rank}


def pretrained_trunk(cfg: RunConfig, train_records, val_records, out: Path, device: torch.device, progress: bool,
                     dist: Distributed) -> Path:
    """RUN/trunk_pretrained.pt for --trunk-pretrain-epochs (pretrain.py): trained here, or kept from an earlier
    start of this run when it was made with the same settings from the same images and weights, or copied from
    --trunk-pretrain-cache where another run with those settings stored it (shared_trunks.py)."""
    from .pretrain import pretrain_trunk, pretraining_settings

    path = (out / PRETRAINED_TRUNK).absolute()
    settings = pretraining_settings(cfg, train_records, val_records)
    if cfg.train.trunk_pretrain_cache:
        shared, problem = SharedTrunk(Path(cfg.train.trunk_pretrain_cache), settings), None
        if dist.enabled:  # rank 0 copies a stored trunk, if any; the others read the copy
            if dist.is_main and stored_settings(path) != settings:
                try:  # no lock: waiting for another run's pre-training would outlast the others' patience
                    _copy_shared_trunk(shared, path)
                except Exception as exc:  # sent to every process, which would otherwise wait forever
                    problem = f"{exc}"
            problem = dist.broadcast(problem)
            if problem:
                raise CaptionerError(problem)
        elif stored_settings(path) != settings:
            with shared:  # a run pre-training the same trunk finishes first
                if not _copy_shared_trunk(shared, path):
                    pretrain_trunk(cfg, train_records, val_records, path, device, progress, settings)
                    shared.store(path)
                    return path
    if path.is_file():
        if stored_settings(path) == settings:
            log.info("using the pre-trained trunk %s (same settings, images and captions)", path)
            return path
        log.info("%s was made with other settings, images or captions: pre-training again", path)
    if dist.enabled:
        raise CaptionerError(f"--trunk-pretrain-epochs: pre-training runs in one process, and {path} is missing or "
                             "was made with other settings. Run `captioner pretrain-trunk` with the same flags "
                             "(--out included, or --trunk-pretrain-cache) first; this run then reuses its file")
    pretrain_trunk(cfg, train_records, val_records, path, device, progress, settings)
    return path


def _copy_shared_trunk(shared: SharedTrunk, path: Path) -> bool:
    copied = shared.copy_to(path)
    if copied:
        log.info("copied the pre-trained trunk %s, stored by a run with the same settings, images and captions "
                 "(--trunk-pretrain-cache)", shared.path)
    return copied


def cross_entropy_epochs(history: list[dict], planned: int) -> int:
    """The run's number of cross-entropy epochs: `planned` (--epochs), or the epoch whose record says early
    stopping ended that phase there. The self-critical epochs, if any, follow on from it."""
    stopped = [r["epoch"] for r in history if r.get("early_stopped")]
    return min(stopped[0], planned) if stopped else planned


def skip_to_update(scheduler, update: int) -> None:
    """Move a step-indexed learning-rate schedule to `update` and set the optimizer's rates to its value there."""
    scheduler.last_epoch = update - 1
    with warnings.catch_warnings():  # before any update (--epochs 0): torch warns that the schedule's first value is
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        scheduler.step()  # skipped, which is the point here


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


def feature_cache_folder(cfg: RunConfig, out: Path) -> Path | None:
    """Where frozen-prefix features are cached, or None when they cannot be (nothing frozen, or augmented
    images, whose features differ every epoch) or the user turned the cache off."""
    setting = cfg.data.feature_cache
    if setting == "off" or cfg.model.trainable_layers >= cfg.model.trunk_stages or cfg.data.augment:
        return None
    return out / "feature_cache" if setting == "auto" else Path(setting)


def open_feature_store(cfg: RunConfig, model, records, folder: Path, device: torch.device,
                       create: bool = True) -> FeatureStore:
    """The FeatureStore of `records` for this model's frozen prefix, keyed by the prefix's weights and BatchNorm
    statistics (after calibration or a resume), the trunk split, the image size and the split's files."""
    size = cfg.data.image_size
    with torch.no_grad():
        probe = model.encoder.forward_prefix(torch.zeros(1, 3, size, size, device=device))  # (1, C, h, w)
    key = {"prefix": tensors_digest(model.encoder.prefix.state_dict()), "trainable_layers": cfg.model.trainable_layers,
           "trunk_stages": cfg.model.trunk_stages,
           "image_size": size, "records": records_digest(records)}
    return FeatureStore.open(folder, key, len(records), probe.shape[1:], create=create)


def existing_feature_store(cfg: RunConfig, model, records, device: torch.device) -> FeatureStore | None:
    """The store the training run of this checkpoint filled for these very images, if there is one (what lets
    `evaluate` skip the JPEGs of a validation split the run already cached)."""
    folder = feature_cache_folder(cfg, Path(cfg.train.out))
    if folder is None or not folder.is_dir():
        return None
    try:
        store = open_feature_store(cfg, model, records, folder, device, create=False)
    except FileNotFoundError:
        return None
    log.info("using cached features from %s (%d of %d images)", store.folder, len(store), len(records))
    return store


def attach_feature_stores(cfg: RunConfig, model, loaders: dict[str, DataLoader], out: Path, device: torch.device,
                          dist: Distributed) -> dict[str, FeatureStore]:
    """One FeatureStore per split (see open_feature_store), attached to the split's dataset. Under torchrun
    rank 0 creates them and the others open them after a barrier."""
    folder = feature_cache_folder(cfg, out)
    if folder is None:
        return {}
    stores = {}
    for split, loader in loaders.items():
        dataset = loader.dataset
        if dist.is_main:
            store = open_feature_store(cfg, model, dataset.records, folder, device)
        dist.barrier()
        if not dist.is_main:
            store = open_feature_store(cfg, model, dataset.records, folder, device, create=False)
        dataset.features = store
        dataset.cache_images = False  # pixels are needed once, for the features; no point keeping them
        stores[split] = store
        log.info("%s features: %s (%d of %d images cached)", split, store.folder, len(store), len(dataset))
    return stores


def _extract(model, loaders: dict[str, DataLoader], stores: dict[str, FeatureStore], device: torch.device,
             dist: Distributed, progress: bool) -> dict[str, Any]:
    """`captioner extract-features`: fill every split's store (each process its share), without training."""
    if not stores:
        raise CaptionerError("nothing to cache: feature caching needs --trainable-layers below 5, no --augment, "
                             "and --feature-cache not 'off'")
    started = time.time()
    for split, loader in loaders.items():
        loader.sampler.set_epoch(1)
        fill_feature_store(model, loader, stores[split], device, progress, desc=f"features {split}")
    dist.barrier()
    return {"rank": dist.rank, "seconds": round(time.time() - started, 2),
            **{split: {"folder": str(s.folder), "cached": len(s), "images": s.meta["num_items"]}
               for split, s in stores.items()}}


def _summed_over_processes(totals: EpochTotals, dist: Distributed, device: torch.device) -> EpochTotals:
    loss_sum, bow_sum, tokens, images, skipped, reward_sum, rewards = dist.sum(
        [totals.loss_sum, totals.bow_sum, totals.tokens, totals.images, totals.skipped_images, totals.reward_sum,
         totals.rewards], device)
    return EpochTotals(loss_sum, bow_sum, int(tokens), int(images), totals.batches, totals.steps, int(skipped),
                       totals.nonfinite_steps, reward_sum, int(rewards))


def _restore(payload: dict[str, Any], path: str, model, optimizer, scheduler, steps_per_epoch: int, out: Path,
             ema: ModelEMA | None = None):
    """Load a checkpoint's training state -> (epoch to run next, best metric, epoch records, mid-epoch totals).
    With a moving average, "model" holds it and "raw_model" the trained weights (see _Checkpointer.weights)."""
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
    history = list(payload["history"]) if "history" in payload else _history_before(out, epoch)
    if batches:  # stopped inside `epoch`: run the rest of it
        log.info("resuming epoch %d at batch %d of %d", epoch, batches, steps_per_epoch)
        return epoch, payload["best_metric"], history, EpochTotals(**payload["epoch_totals"])
    return epoch + 1, payload["best_metric"], history, None
