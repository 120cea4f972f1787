"""Typed configuration: built once (from the CLI or a JSON file), saved in every run folder and checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import CaptionerError


@dataclass
class ModelConfig:
    encoder_weights: str = "none"  # imagenet | none | PATH
    trunk_stages: int = 3  # ResNet18 stages kept from the input end: 3 up to layer2 (stride 8), 5 whole (stride 32)
    trainable_layers: int = 0  # kept stages trained, from the output end: 0 frozen; with 5 kept, 5 all, 1 layer4 only
    grid_convs: int = 2  # trained 3x3 convolutions over the trunk's grid, before the bridge
    grid_width: int = 128  # their channels
    grid_pool: int = 3  # max pool after them (ceil mode): 3 makes a 20x20 grid 7x7 (about an eighth of the tokens)
    bridge: str = "attention"  # attention | pool | conv
    bridge_layers: int = 1
    grid_summary: bool = True  # add the projected per-channel maximum of the grid to every memory token
    decoder: str = "transformer"  # transformer | lstm (soft attention)
    decoder_layers: int = 2  # transformer only
    attention_reg: float = 1.0  # lstm only: weight of the doubly stochastic attention regulariser (0 = off)
    dim: int = 256
    heads: int = 4
    dropout: float = 0.1
    max_len: int = 40  # tokens, bos included
    bow_weight: float = 1.0  # weight of the auxiliary bag-of-words loss (0 = no head)
    bow_input: str = "grid"  # what the bag-of-words head reads: grid (max over cells) | memory (mean token)
    vocab_size: int = 0  # set from the trained tokenizer


# What a saved config without these keys built: the whole trunk, no grid convolutions, the bag-of-words head on
# the mean memory token, no grid summary in the memory.
MODEL_KEYS_BEFORE_THEY_EXISTED: dict[str, Any] = {"trunk_stages": 5, "grid_convs": 0, "grid_width": 256,
                                                  "grid_pool": 1, "bow_input": "memory",
                                                  "grid_summary": False}


@dataclass
class DataConfig:
    dataset: str = "coco"  # coco | karpathy | flickr8k
    train_captions: str = ""
    train_images: str = ""
    val_captions: str = ""
    val_images: str = ""
    root: str = ""
    karpathy_json: str = ""
    image_size: int = 160
    augment: bool = False
    augment_scale_min: float = 0.85  # with augment: smallest share of the image's area a random crop keeps
    color_jitter: float = 0.1  # with augment: brightness, contrast and saturation factors in [1 - s, 1 + s]
    hflip: bool = False  # with augment: mirror half the images, swapping "left" and "right" in their captions
    # with augment: where the crops and jitter are computed. workers: in the DataLoader workers, image by image;
    # device: as a batch on the training device (data/device_augment.py); auto: device on CUDA, workers on a CPU
    augment_on: str = "auto"
    cache_images: bool = True
    gpu_decode: bool = False  # decode JPEGs with nvjpeg on the CUDA device (workers only read bytes)
    feature_cache: str = "auto"  # frozen-prefix features on disk: auto (RUN/feature_cache) | off | a folder
    val_limit: int = 0  # 0 = whole validation split
    strict: bool = False


@dataclass
class TrainConfig:
    out: str = "runs/default"
    tensorboard: bool = False  # also write each epoch's log record as TensorBoard scalars to OUT/tensorboard
    epochs: int = 10
    batch_size: int = 16
    accumulate: int = 1  # batches whose gradients are summed per update (effective batch = batch_size x this)
    captions_per_image: int = 2  # captions sampled per image per step (0 = all); the decoder's cost scales with it
    lr: float = 1e-3
    encoder_lr: float = 0.0  # 0 = same as lr
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    vocab_size: int = 4000
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    val_beam_size: int = 1
    deterministic: bool = False
    checkpoint_every: int = 0  # also write last.pt every N batches inside an epoch (0 = off)
    checkpoint_minutes: float = 10.0  # ... and whenever this many minutes passed since the last write (0 = off)
    ema_decay: float = 0.0  # exponential moving average of the weights, validated and saved in best.pt (0 = off)
    early_stop_patience: int = 0  # stop when validation BLEU-4 has not improved for this many epochs (0 = off)
    compile: bool = False  # torch.compile the training forward (trunk, bridge, decoder)
    cpu_bf16: bool = False  # bf16 autocast for training steps on CPU too (CUDA always uses it)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    # Before captioning, train the trunk alone to predict the captions' content words (pretrain.py; 0 = off)
    trunk_pretrain_epochs: int = 0
    trunk_pretrain_lr: float = 2e-3
    trunk_pretrain_tags: int = 1000  # the most used content words of the training captions
    trunk_pretrain_crop: float = 0.35  # smallest share of the image's area its random crops keep
    trunk_pretrain_loss: str = "sigmoid"  # sigmoid (per-tag binary cross-entropy) | softmax (one over all tags)
    init_from: str = ""  # a checkpoint whose model (settings, weights, tokenizer) this new run starts from
    trunk_pretrain_cache: str = ""  # folder of pre-trained trunks shared between runs (shared_trunks.py; "" = none)
    # After the `epochs` of cross-entropy, this many epochs of self-critical training on BLEU (scst.py; 0 = off)
    scst_epochs: int = 0
    scst_lr: float = 5e-5  # constant learning rate of those epochs (the trunk's scaled as encoder_lr / lr)
    scst_samples: int = 5  # captions sampled per image per step (at least 2)
    scst_reward: str = "bleu"  # bleu (smoothed sentence BLEU-4) | cider (CIDEr-D, training captions' frequencies)
    scst_start: str = "best"  # best (the best cross-entropy epoch's weights, from best.pt) | last (the last epoch's)


# The settings that take one of a few names: `captioner train` offers them as its flags' choices, and a config
# file (or a saved one) is checked against them on loading.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "dataset"): ("coco", "flickr8k", "karpathy"),
    ("data", "augment_on"): ("auto", "workers", "device"),
    ("model", "bridge"): ("attention", "pool", "conv"),
    ("model", "decoder"): ("transformer", "lstm"),
    ("model", "bow_input"): ("grid", "memory"),
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("train", "trunk_pretrain_loss"): ("sigmoid", "softmax"),
    ("train", "scst_reward"): ("bleu", "cider"),
    ("train", "scst_start"): ("best", "last"),
}

# The range each numeric setting must lie in: (section, key) -> (lowest, highest), None for no bound, a bound in
# a 1-tuple excluded. Checked before a run starts (RunConfig.problems), so that a value out of range is named
# with its flag instead of surfacing as a traceback from deep inside torch or SentencePiece, or not at all.
LIMITS: dict[tuple[str, str], tuple[Any, Any]] = {
    ("data", "image_size"): (16, None), ("data", "augment_scale_min"): ((0.0,), 1.0),
    ("data", "color_jitter"): (0.0, 1.0), ("data", "val_limit"): (0, None),
    ("model", "trunk_stages"): (1, 5), ("model", "trainable_layers"): (0, 5),  # and <= trunk_stages (encoder.py)
    ("model", "grid_convs"): (0, None), ("model", "grid_width"): (1, None), ("model", "grid_pool"): (1, None),
    ("model", "dim"): (8, None), ("model", "heads"): (1, None), ("model", "decoder_layers"): (1, None),
    ("model", "bridge_layers"): (0, None), ("model", "dropout"): (0.0, (1.0,)), ("model", "max_len"): (3, None),
    ("model", "attention_reg"): (0.0, None), ("model", "bow_weight"): (0.0, None),
    ("train", "epochs"): (0, None), ("train", "batch_size"): (1, None), ("train", "accumulate"): (1, None),
    ("train", "captions_per_image"): (0, None), ("train", "lr"): (0.0, None), ("train", "encoder_lr"): (0.0, None),
    ("train", "weight_decay"): (0.0, None), ("train", "warmup_epochs"): (0.0, None),
    ("train", "label_smoothing"): (0.0, (1.0,)), ("train", "clip_grad"): (0.0, None),
    ("train", "vocab_size"): (16, None),
    ("train", "workers"): (0, None), ("train", "val_beam_size"): (1, None), ("train", "checkpoint_every"): (0, None),
    ("train", "checkpoint_minutes"): (0.0, None), ("train", "ema_decay"): (0.0, (1.0,)),
    ("train", "early_stop_patience"): (0, None), ("train", "trunk_pretrain_epochs"): (0, None),
    ("train", "trunk_pretrain_lr"): ((0.0,), None), ("train", "trunk_pretrain_tags"): (1, None),
    ("train", "trunk_pretrain_crop"): ((0.0,), 1.0), ("train", "scst_epochs"): (0, None),
    ("train", "scst_lr"): ((0.0,), None),
    ("train", "scst_samples"): (2, None),  # each sample's reward is compared with the others' of its image
}


def _out_of_range(value: float, lowest: Any, highest: Any) -> str | None:
    """What `value` breaks of [lowest, highest] (a bound in a 1-tuple excluded), or None."""
    if isinstance(lowest, tuple) and not value > lowest[0]:
        return f"must be above {lowest[0]:g}"
    if lowest is not None and not isinstance(lowest, tuple) and not value >= lowest:
        return f"must be at least {lowest:g}"
    if isinstance(highest, tuple) and not value < highest[0]:
        return f"must be below {highest[0]:g}"
    if highest is not None and not isinstance(highest, tuple) and not value <= highest:
        return f"must be at most {highest:g}"
    return None


# A field's annotation (a string under `from __future__ import annotations`) -> the JSON values it accepts
_JSON_KINDS = {"bool": ("true or false", (bool,)), "int": ("a whole number", (int,)),
               "float": ("a number", (int, float)), "str": ("a string", (str,))}


def _checked_value(value: Any, section: str, kind: str, key: str, source: str) -> Any:
    """`value` for section.key as the dataclass types it, or a CaptionerError naming the file, the key and what
    it needs: a config file's "epochs": 1.5 or "augment": "no" would otherwise train something else than asked
    (a non-empty string is true) or fail much later with a traceback."""
    described, types = _JSON_KINDS[kind]
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, types):
        raise CaptionerError(f"{source}: {section}.{key} must be {described}, got {json.dumps(value)}")
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise CaptionerError(f"{source}: {section}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if kind == "float" else value


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """Each setting out of its range (LIMITS), as `--flag (section.key) must be ..., got VALUE`; and a width
        the attention heads do not divide."""
        found = []
        for (section, key), (lowest, highest) in LIMITS.items():
            value = getattr(getattr(self, section), key)
            broken = _out_of_range(value, lowest, highest)
            if broken:
                found.append(f"--{key.replace('_', '-')} ({section}.{key}) {broken}, got {value:g}")
        if self.model.heads >= 1 and self.model.dim % self.model.heads:
            found.append(f"--dim ({self.model.dim}) must be a multiple of --heads ({self.model.heads})")
        if self.train.lr == 0 and self.train.scst_epochs > 0:  # the schedule holds --scst-lr as a share of --lr
            found.append("--lr 0 leaves no learning rate to scale --scst-lr from; give --lr above 0")
        return found

    def check(self) -> None:
        """A CaptionerError naming every problem() at once; before a run reads or writes anything."""
        found = self.problems()
        if found:
            raise CaptionerError("settings out of range: " + "; ".join(found))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        """Strict: an unknown section or key, a value of the wrong type or a name outside a setting's choices is
        an error naming it (a typo must not be silently ignored)."""
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        built = {}
        for name, value in d.items():
            if name not in sections:
                raise CaptionerError(f"{source}: unknown section {name!r} (expected {', '.join(sections)})")
            if not isinstance(value, dict):
                raise CaptionerError(f"{source}: section {name!r} must be a JSON object of settings")
            kinds = {f.name: f.type for f in fields(sections[name])}
            unknown = set(value) - set(kinds)
            if unknown:
                raise CaptionerError(f"{source}: unknown key(s) {sorted(unknown)} in section {name!r}")
            built[name] = sections[name](**{key: _checked_value(v, name, kinds[key], key, source)
                                            for key, v in value.items()})
        return cls(**built)

    @classmethod
    def from_saved(cls, d: dict[str, Any], source: str) -> "RunConfig":
        """A config a run wrote (checkpoint, RUN/config.json): as from_dict, except that model keys added since
        that run take the values that reproduce the model it built, not today's defaults."""
        model = d.get("model")
        if isinstance(model, dict):
            d = {**d, "model": {**MODEL_KEYS_BEFORE_THEY_EXISTED, **model}}
        return cls.from_dict(d, source=source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CaptionerError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(d, dict):
            raise CaptionerError(f"config file {path}: expected a JSON object with model/data/train sections")
        return cls.from_dict(d, source=str(path))
