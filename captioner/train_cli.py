"""`captioner train` flags <-> RunConfig. Precedence: built-in defaults < --config FILE < flags given."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from .config import CHOICES, RunConfig
from .errors import CaptionerError

log = logging.getLogger(__name__)

# flag -> (config section, key, type or "bool"), one line per flag; argparse default is SUPPRESS, so only flags
# the user actually typed override the config file.
TRAIN_FLAGS = {
    "--dataset": ("data", "dataset", str),
    "--train-captions": ("data", "train_captions", str),
    "--train-images": ("data", "train_images", str),
    "--val-captions": ("data", "val_captions", str),
    "--val-images": ("data", "val_images", str),
    "--root": ("data", "root", str),
    "--karpathy-json": ("data", "karpathy_json", str),
    "--image-size": ("data", "image_size", int),
    "--augment": ("data", "augment", "bool"),
    "--augment-scale-min": ("data", "augment_scale_min", float),
    "--color-jitter": ("data", "color_jitter", float),
    "--hflip": ("data", "hflip", "bool"),
    "--augment-on": ("data", "augment_on", str),
    "--cache-images": ("data", "cache_images", "bool"),
    "--gpu-decode": ("data", "gpu_decode", "bool"),
    "--feature-cache": ("data", "feature_cache", str),
    "--val-limit": ("data", "val_limit", int),
    "--strict": ("data", "strict", "bool"),
    "--encoder-weights": ("model", "encoder_weights", str),
    "--trunk-stages": ("model", "trunk_stages", int),
    "--trainable-layers": ("model", "trainable_layers", int),
    "--grid-convs": ("model", "grid_convs", int),
    "--grid-width": ("model", "grid_width", int),
    "--grid-pool": ("model", "grid_pool", int),
    "--bridge": ("model", "bridge", str),
    "--bridge-layers": ("model", "bridge_layers", int),
    "--grid-summary": ("model", "grid_summary", "bool"),
    "--decoder": ("model", "decoder", str),
    "--decoder-layers": ("model", "decoder_layers", int),
    "--attention-reg": ("model", "attention_reg", float),
    "--dim": ("model", "dim", int),
    "--heads": ("model", "heads", int),
    "--dropout": ("model", "dropout", float),
    "--max-len": ("model", "max_len", int),
    "--bow-weight": ("model", "bow_weight", float),
    "--bow-input": ("model", "bow_input", str),
    "--out": ("train", "out", str),
    "--tensorboard": ("train", "tensorboard", "bool"),
    "--epochs": ("train", "epochs", int),
    "--batch-size": ("train", "batch_size", int),
    "--accumulate": ("train", "accumulate", int),
    "--captions-per-image": ("train", "captions_per_image", int),
    "--lr": ("train", "lr", float),
    "--encoder-lr": ("train", "encoder_lr", float),
    "--weight-decay": ("train", "weight_decay", float),
    "--warmup-epochs": ("train", "warmup_epochs", float),
    "--label-smoothing": ("train", "label_smoothing", float),
    "--clip-grad": ("train", "clip_grad", float),
    "--vocab-size": ("train", "vocab_size", int),
    "--seed": ("train", "seed", int),
    "--device": ("train", "device", str),
    "--workers": ("train", "workers", int),
    "--val-beam-size": ("train", "val_beam_size", int),
    "--deterministic": ("train", "deterministic", "bool"),
    "--ema-decay": ("train", "ema_decay", float),
    "--early-stop-patience": ("train", "early_stop_patience", int),
    "--checkpoint-every": ("train", "checkpoint_every", int),
    "--checkpoint-minutes": ("train", "checkpoint_minutes", float),
    "--on-nonfinite": ("train", "on_nonfinite", str),
    "--compile": ("train", "compile", "bool"),
    "--cpu-bf16": ("train", "cpu_bf16", "bool"),
    "--trunk-pretrain-epochs": ("train", "trunk_pretrain_epochs", int),
    "--trunk-pretrain-lr": ("train", "trunk_pretrain_lr", float),
    "--trunk-pretrain-tags": ("train", "trunk_pretrain_tags", int),
    "--trunk-pretrain-crop": ("train", "trunk_pretrain_crop", float),
    "--trunk-pretrain-loss": ("train", "trunk_pretrain_loss", str),
    "--trunk-pretrain-cache": ("train", "trunk_pretrain_cache", str),
    "--init-from": ("train", "init_from", str),
    "--scst-epochs": ("train", "scst_epochs", int),
    "--scst-lr": ("train", "scst_lr", float),
    "--scst-samples": ("train", "scst_samples", int),
    "--scst-reward": ("train", "scst_reward", str),
    "--scst-start": ("train", "scst_start", str),
}

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    defaults = RunConfig().to_dict()
    p.add_argument("--config", help="JSON file with model/data/train sections (flags given here override it)")
    p.add_argument("--resume", help="continue from a checkpoint (e.g. RUN/last.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="train in a folder that holds another run's checkpoints, removing them once training starts "
                        "(without it that is refused; extract-features and pretrain-trunk ignore it)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (and, with output to a file, no progress lines)")
    for flag, (section, key, kind) in TRAIN_FLAGS.items():
        default = defaults[section][key]
        help_text = f"{section}.{key} (default: {default})"
        if kind == "bool":
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            p.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, choices=CHOICES.get((section, key)),
                           help=help_text)


# The dataset flags each --dataset reads (data/factory.py); a typed flag of another dataset would be ignored
DATASET_KEYS = {"coco": ("train_captions", "train_images", "val_captions", "val_images"),
                "flickr8k": ("root",), "karpathy": ("karpathy_json", "root")}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig.load(args.config) if args.config else RunConfig()
    for section, key, _ in TRAIN_FLAGS.values():
        if hasattr(args, key):
            setattr(getattr(cfg, section), key, getattr(args, key))
    _check_typed_flags(args, cfg)
    return cfg


def _check_typed_flags(args: argparse.Namespace, cfg: RunConfig) -> None:
    """No typed flag is ignored without a word: one naming another dataset's files is a usage error; with
    --resume, model and data flags are named in a warning (the run continues as it was built and fed)."""
    typed = [(flag, section, key) for flag, (section, key, _) in TRAIN_FLAGS.items() if hasattr(args, key)]
    if getattr(args, "resume", None):
        kept = [flag for flag, section, _ in typed if section in ("model", "data")]
        if kept and os.environ.get("RANK", "0") == "0":
            log.warning("--resume continues the run with its own model and data settings; ignored: %s",
                        ", ".join(kept))
        return
    read = DATASET_KEYS.get(cfg.data.dataset, ())
    other = [flag for flag, _, key in typed
             if key not in read and any(key in keys for keys in DATASET_KEYS.values())]
    if other:
        raise CaptionerError(f"--dataset {cfg.data.dataset} reads {', '.join(_flag(k) for k in read)}; "
                             f"{', '.join(other)} {'belongs' if len(other) == 1 else 'belong'} to another dataset")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def typed_model_settings(args: argparse.Namespace) -> set[str]:
    """The model settings and the image size this command line sets: by a flag typed, or in the --config file's
    "model" section (and its "data" section's image_size). A run started with --init-from takes the others from
    its checkpoint; of these, those that would change the architecture are refused (init_from.py)."""
    given = {key for section, key, _ in TRAIN_FLAGS.values()
             if (section == "model" or key == "image_size") and hasattr(args, key)}
    if args.config:  # already read and checked by config_from_args
        saved = json.loads(Path(args.config).read_text())
        given |= set(saved.get("model", {})) | ({"image_size"} & set(saved.get("data", {})))
    return given


def given_train_settings(args: argparse.Namespace) -> set[str]:
    """The train-section settings this command line sets: by a flag typed, or in the --config file's "train"
    section. A resumed run takes the others from its checkpoint (fit's `resume_changes`)."""
    given = {key for section, key, _ in TRAIN_FLAGS.values() if section == "train" and hasattr(args, key)}
    if args.config:  # already read and checked by config_from_args
        given |= set(json.loads(Path(args.config).read_text()).get("train", {}))
    return given
