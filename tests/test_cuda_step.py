"""How often a training step makes the host wait for the GPU (CUDA only; skipped elsewhere).

Every wait drains the GPU's queue: the GPU then idles while the host prepares and launches what comes next, so a
step with many waits runs at the sum of host and GPU time instead of the larger of the two. A step from cached
features needs exactly one: the losses and the gradient norm, read together after backward and clipping, to
decide whether the optimizer steps. The captions' layout and the cached-row choice are worked out on the host
(CaptionLayout, Batch.to keeping `has_features` there) precisely so that they add none.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from captioner.data.collate import Batch, teacher_forcing_tensors
from captioner.engine import train_one_epoch
from captioner.training import make_optimizer
from conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _cached_batch(model, images: int = 4, captions_per_image: int = 2, size: int = 64) -> Batch:
    """A pinned batch whose images all come as stored prefix features, as from a filled FeatureStore."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feature_shape = model.encoder.forward_prefix(torch.zeros(1, 3, size, size, device=CUDA)).shape[1:]
    captions = [torch.randint(4, model.cfg.vocab_size, (n,), generator=generator).tolist()
                for n in [3, 5, 2, 7, 4, 4, 6, 1][: images * captions_per_image]]
    tokens_in, targets = teacher_forcing_tensors(captions)
    bow = torch.zeros(images, model.cfg.vocab_size)
    return Batch(torch.zeros(images, 3, size, size, dtype=torch.uint8), tokens_in, targets,
                 torch.arange(images).repeat_interleave(captions_per_image), [["a caption"]] * images,
                 list(range(images)), [f"image{i}.jpg" for i in range(images)], list(range(images)), 0, bow,
                 torch.randn(images, *feature_shape, generator=generator).half(),
                 torch.ones(images, dtype=torch.bool)).pin_memory()


def test_a_training_step_from_cached_features_waits_for_the_gpu_once():
    model = tiny_model(trainable_layers=0).to(CUDA).train()
    optimizer = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = _cached_batch(model)
    train_one_epoch(model, [batch], optimizer, scheduler, CUDA, 0, progress=False)  # kernels, allocator, cuBLAS
    torch.cuda.synchronize()
    steps = 3
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_one_epoch(model, [batch] * steps, optimizer, scheduler, CUDA, 0, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(waits) == steps, waits
