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
