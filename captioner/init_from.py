"""A new run that starts from another run's model: `train --init-from CHECKPOINT`.

Why: fine-tuning a trained captioner on other data, or giving a trained model self-critical epochs
(`--epochs 0 --scst-epochs N`) with settings its own run did not have, without that run's optimizer state: an
exported model (`captioner export`, a third of a training checkpoint or less) is enough. Unlike `--resume`, the
run is new: its own folder, optimizer, schedule, epochs and data. What it takes from the checkpoint is the model:
the architecture (the checkpoint's model settings), the weights (a moving-average checkpoint's average, which is
what its "model" holds), the tokenizer, and unless `--image-size` is given, the image size the model was trained
at. Of the model settings, only `--trainable-layers`, `--dropout`, `--attention-reg` and `--bow-weight` may be set
differently (on the command line or in a --config file's model section); the trunk's stages are then re-split
between the frozen prefix and the trained suffix, so the same weights load either way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any

from torch import nn

from .checkpoint import clean_state_dict, load_checkpoint
from .config import RunConfig
from .errors import CaptionerError

log = logging.getLogger(__name__)

INIT_MAY_CHANGE = ("trainable_layers", "dropout", "attention_reg", "bow_weight")
"""The model settings a run started with --init-from may set differently from its checkpoint: which stages train,
and the regularisers and loss weights, which change no weight's shape (the bag-of-words head exists while
bow_weight is above 0, so that must stay so)."""
IGNORED_WITH_INIT = ("encoder_weights",)  # the trunk's weights come from the checkpoint

_TRUNK_KEY = re.compile(r"^encoder\.(prefix|suffix)\.(\d+)\.(.*)$")


def adopt_checkpoint_model(cfg: RunConfig, typed_model_settings: Collection[str] | None) -> dict[str, Any]:
    """Read cfg.train.init_from and give `cfg` its model settings (except those of INIT_MAY_CHANGE typed on the
    command line, `typed_model_settings`) and its image size (unless typed) -> the checkpoint's payload. A typed
    model setting that would change the architecture is an error naming it; trunk pre-training is switched off
    (the trunk comes from the checkpoint)."""
    path = cfg.train.init_from
    payload = load_checkpoint(path)
    saved_run = RunConfig.from_saved(payload["config"], source=f"checkpoint {path}")
    saved, typed = saved_run.model, set(typed_model_settings or ())
    if "image_size" not in typed and cfg.data.image_size != saved_run.data.image_size:
        log.info("--init-from %s: images at %d px, the size the model was trained at (--image-size to change it)",
                 path, saved_run.data.image_size)
        cfg.data.image_size = saved_run.data.image_size
    typed.discard("image_size")
    conflicting = sorted(k for k in typed - set(INIT_MAY_CHANGE) - set(IGNORED_WITH_INIT)
                         if getattr(cfg.model, k) != getattr(saved, k))
    if "bow_weight" in typed and (cfg.model.bow_weight > 0) != (saved.bow_weight > 0):
        conflicting.append("bow_weight")  # adds or removes the bag-of-words head
    if conflicting:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg.model, k)} (the model's: {getattr(saved, k)})"
                          for k in conflicting)
        raise CaptionerError(f"--init-from {path}: the run takes its model from that checkpoint, so {flags} cannot "
                             f"change (flags or the --config file's model section); of the model settings only "
                             f"{', '.join('--' + k.replace('_', '-') for k in INIT_MAY_CHANGE)} may, and "
                             "--bow-weight only while it stays above 0 or at 0")
    for key in INIT_MAY_CHANGE:
        if key in typed:
            setattr(saved, key, getattr(cfg.model, key))
    cfg.model = saved
    if cfg.train.trunk_pretrain_epochs:
        log.info("--init-from %s: the trunk comes from that model; trunk pre-training (%d epochs) is skipped", path,
                 cfg.train.trunk_pretrain_epochs)
        cfg.train.trunk_pretrain_epochs = 0
    return payload


def load_initial_weights(model: nn.Module, payload: dict[str, Any], path: str) -> None:
    """The checkpoint's weights into `model`, its trunk stages re-split to `model`'s frozen prefix and trained
    suffix (see resplit_trunk). A mismatch is an error naming the file."""
    saved = RunConfig.from_saved(payload["config"], source=f"checkpoint {path}").model
    state = resplit_trunk(clean_state_dict(payload["model"]), saved.trunk_stages - saved.trainable_layers,
                          len(model.encoder.prefix))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CaptionerError(f"--init-from {path}: its weights do not fit this run's model: "
                             f"{str(exc).splitlines()[0]}") from None
    log.info("initialised from %s (epoch %s, validation BLEU-4 %s)", path, payload.get("epoch"),
             payload.get("best_metric"))


def resplit_trunk(state: dict[str, Any], saved_split: int, split: int) -> dict[str, Any]:
    """State-dict keys of a trunk whose first `saved_split` stages were its frozen prefix -> the keys of the same
    trunk with `split` stages frozen: stage s is encoder.prefix.{s} below the split, encoder.suffix.{s - split}
    from it on. Other keys are unchanged."""
    if saved_split == split:
        return state
    out = {}
    for key, value in state.items():
        match = _TRUNK_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        part, index, rest = match.groups()
        stage = int(index) + (0 if part == "prefix" else saved_split)
        out[f"encoder.prefix.{stage}.{rest}" if stage < split else f"encoder.suffix.{stage - split}.{rest}"] = value
    return out
