"""`fit(cfg)`: the whole training run — data, vocabulary, model, epochs, validation BLEU, checkpoints, logs.

Run folder: config.json (resolved config), log.jsonl (one JSON line per epoch), last.pt (every epoch),
best.pt (best validation BLEU-4 by real decoding); run_files.py writes and reads them. What the run reads (records,
loaders, the feature cache) is set up by training_data.py; stop_signals.py owns SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import check_writable_folder, load_checkpoint, remove_stale_temporaries, tokenizer_from_payload
from .config import RunConfig
from .curves import TENSORBOARD_DIR, write_epoch_scalars
from .data.dataset import stop_workers
from .data.sampling import EpochSampler
from .decoding import DecodeOptions
from .distributed import Distributed, init_distributed, shutdown_distributed
from .ema import ModelEMA
from .engine import EpochTotals, NonFiniteLossError, compile_training_forward, evaluate, train_one_epoch, \
    warmup_cosine
from .init_from import adopt_checkpoint_model, load_initial_weights
from .errors import CaptionerError
from .models.captioner import Captioner
from .run_files import (Checkpointer, best_epoch, earlier_run_files, remove_earlier_run, restore_best_weights,
                        restore_training_state, write_log)
from .shared_trunks import SharedTrunk, stored_settings
from .scst import SelfCriticalBatches, check_scst_settings, make_reward, then_constant
from .stop_signals import StopSignals
from .text import Tokenizer
from .training_data import (attach_feature_stores, calibrate_frozen_trunk, extract_features, make_loader,
                            train_and_val_records)

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


class TrainStep(nn.Module):
    """`model.forward_train` as a module's forward, which is what DistributedDataParallel wraps and syncs."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.forward_train(*args, **kwargs)


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
    checkpointer = Checkpointer(out, cfg, tokenizer, steps_per_epoch, is_main=dist.is_main)

    if payload is None and not initialised and start_weights == "none" and model.encoder.has_frozen_prefix:
        calibrate_frozen_trunk(model, train_loader.dataset, t.seed, device)
    ema = checkpointer.ema = ModelEMA(model, t.ema_decay) if t.ema_decay > 0 else None
    start_epoch, best, history, totals = 1, float("-inf"), [], None
    if payload is not None:
        start_epoch, best, history, totals = restore_training_state(payload, resume, model, optimizer, scheduler, steps_per_epoch,
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
        return extract_features(model, {"train": train_loader, "val": val_loader}, stores, device, dist, progress)
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


def _summed_over_processes(totals: EpochTotals, dist: Distributed, device: torch.device) -> EpochTotals:
    loss_sum, bow_sum, tokens, images, skipped, reward_sum, rewards = dist.sum(
        [totals.loss_sum, totals.bow_sum, totals.tokens, totals.images, totals.skipped_images, totals.reward_sum,
         totals.rewards], device)
    return EpochTotals(loss_sum, bow_sum, int(tokens), int(images), totals.batches, totals.steps, int(skipped),
                       totals.nonfinite_steps, reward_sum, int(rewards))
