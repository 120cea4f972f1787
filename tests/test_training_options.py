"""Gradient accumulation (K micro-batches, one update, as if they were one K-times-larger batch), --compile and
--cpu-bf16."""

from __future__ import annotations

import copy

import torch

from captioner.data import CaptionDataset, load_coco
from captioner.data.collate import CaptionCollate
from captioner.engine import EpochTotals, train_one_epoch
from captioner.text import Tokenizer
from conftest import tiny_model


def _setup(synthetic_dataset, images: int):
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[:images]
    tokenizer = Tokenizer.train(c for r in records for c in r.captions)
    dataset = CaptionDataset(records, 64, cache_images=True)
    collate = CaptionCollate(tokenizer, 24, 0)  # every caption: no random choice
    # No trained BatchNorm (frozen trunk, no grid convolutions): each forward pass moves running statistics, so
    # two micro-batches would update them twice where one batch updates them once, whatever the gradients do.
    model = tiny_model(vocab_size=tokenizer.vocab_size, trainable_layers=0, grid_convs=0)
    return model, dataset, collate


def _train(model, batches, accumulate: int):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    calls = []
    totals = EpochTotals()
    train_one_epoch(model, batches, optimizer, scheduler, torch.device("cpu"), 1, progress=False, totals=totals,
                    on_batch=lambda t: calls.append(t.batches), accumulate=accumulate)
    return totals, scheduler.last_epoch, calls


def test_two_identical_micro_batches_make_the_update_of_one(synthetic_dataset):
    model, dataset, collate = _setup(synthetic_dataset, 4)
    batch = collate([dataset[i] for i in range(4)])
    once, twice = copy.deepcopy(model), copy.deepcopy(model)
    _train(once, [batch], accumulate=1)
    totals, updates, calls = _train(twice, [batch, batch], accumulate=2)
    assert (totals.batches, totals.steps, updates, calls) == (2, 1, 1, [2])
    for (name, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), twice.state_dict().values()))
    assert changed


def test_a_short_last_group_still_updates(synthetic_dataset):
    model, dataset, collate = _setup(synthetic_dataset, 6)
    batches = [collate([dataset[i], dataset[i + 1]]) for i in (0, 2, 4)]
    totals, updates, calls = _train(model, batches, accumulate=2)
    assert (totals.batches, totals.steps, updates, calls) == (3, 2, 2, [2, 3])


def test_compile_flag_trains_through_the_compiled_forward(synthetic_dataset, tmp_path, monkeypatch):
    """Wiring only: torch.compile itself is replaced by a recorder (a real compile takes minutes on 2 cores)."""
    from captioner.cli import main
    from conftest import TINY

    compiled = []

    def recording_compile(fn, **kwargs):
        def wrapper(*args, **kwargs):
            compiled.append((len(args), sorted(kwargs)))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "compile", recording_compile)
    d = synthetic_dataset
    assert main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(tmp_path / "run"), "--epochs", "1", *TINY, "--compile", "--accumulate", "2"]) == 0
    # every training batch (48 images, batch 16) went through it, with its caption layout worked out on the host,
    # asking for the real positions' logits only
    assert compiled == [(4, ["layout", "packed_logits"])] * 3


def test_early_stop_after_patience_epochs_without_improvement(synthetic_dataset, tmp_path, capsys):
    """With lr 0, a frozen trunk and no dropout nothing changes between epochs, so validation BLEU-4 never improves
    on epoch 1: patience 2 ends a 6-epoch run after epoch 3, with best.pt at epoch 1."""
    import json

    from captioner.checkpoint import load_checkpoint
    from captioner.cli import main
    from conftest import TINY

    d, out = synthetic_dataset, tmp_path / "run"
    assert main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(out), "--epochs", "6", *TINY, "--lr", "0", "--trainable-layers", "0", "--dropout", "0",
                 "--val-limit", "2", "--early-stop-patience", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["epochs_run"], printed["best_epoch"]) == (3, 1)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert len({r["val_Bleu_4"] for r in log}) == 1
    assert [r.get("early_stopped", False) for r in log] == [False, False, True]
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert (last["epoch"], best["epoch"], last["history"]) == (3, 1, log)


def test_cpu_bf16_runs_the_training_step_in_bf16_on_cpu(synthetic_dataset):
    model, dataset, collate = _setup(synthetic_dataset, 4)
    batch = collate([dataset[i] for i in range(4)])
    seen = []
    model.decoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for cpu_bf16 in (False, True):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stats = train_one_epoch(model, [batch], optimizer, scheduler, torch.device("cpu"), 1, progress=False,
                                cpu_bf16=cpu_bf16)
        assert torch.isfinite(torch.tensor(stats["train_loss"]))
    assert seen == [torch.float32, torch.bfloat16]  # the decoder's logits: fp32 by default, bf16 with the flag
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32


def test_cpu_bf16_flag_reaches_the_training_step(synthetic_dataset, tmp_path, monkeypatch):
    from captioner import engine
    from captioner.cli import main
    from conftest import TINY

    asked = []
    real = engine.autocast_for

    def recording(device, cpu_bf16=False):
        asked.append(cpu_bf16)
        return real(device, cpu_bf16)

    monkeypatch.setattr(engine, "autocast_for", recording)
    d = synthetic_dataset
    assert main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(tmp_path / "run"), "--epochs", "1", *TINY, "--cpu-bf16"]) == 0
    assert asked.count(True) == 3  # every training batch (48 images, batch 16); decoding stays fp32
