"""Shared fixtures: tiny models and a tiny synthetic dataset, all on CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioner.config import ModelConfig
from captioner.models.captioner import Captioner

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = dict(vocab_size=40, dim=32, heads=4, decoder_layers=2, bridge_layers=1, dropout=0.0, max_len=24)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def tiny_model(**overrides) -> Captioner:
    torch.manual_seed(0)
    return Captioner(tiny_model_config(**overrides)).eval()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic COCO-format dataset shared by the end-to-end tests."""
    from captioner.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=48, num_val=8, seed=3)


TINY = ["--image-size", "64", "--dim", "32", "--heads", "4", "--decoder-layers", "1", "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--vocab-size", "200"]


@pytest.fixture(scope="session")
def trained_run(synthetic_dataset, tmp_path_factory):
    """A tiny model trained 2 epochs through the CLI: RUN/{best,last}.pt, config.json, log.jsonl."""
    from captioner.cli import main

    out = tmp_path_factory.mktemp("run")
    d = synthetic_dataset
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions),
                 "--train-images", str(d.train_images), "--val-captions", str(d.val_captions),
                 "--val-images", str(d.val_images), "--out", str(out), "--epochs", "2", *TINY])
    assert code == 0
    return out
