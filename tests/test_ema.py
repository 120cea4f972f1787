"""The moving average of the weights (--ema-decay): its arithmetic, and what training validates and saves."""

from __future__ import annotations

import torch
from torch import nn

from captioner.checkpoint import load_checkpoint, load_model
from captioner.cli import main
from captioner.ema import ModelEMA
from conftest import TINY


def test_update_moves_floats_towards_the_model_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.99)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its batch counter
    ema.update(model)
    # first update: decay min(0.99, (1 + 0) / (10 + 0)) = 0.1, i.e. 90% of the way to the model
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(ema.state_dict()[key], start[key] + 0.9 * (value - start[key]), atol=1e-6), key
    assert ema.state_dict()["1.num_batches_tracked"].item() == 1
    assert ema.updates == 1 and ema.current_decay() == 2 / 11
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    for _ in range(1000):
        ema.update(model)
    assert ema.current_decay() == 0.99  # the cap, once (1 + n) / (10 + n) passes it


def train(dataset, out, *extra) -> int:
    d = dataset
    return main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(out), *TINY, *extra])


def test_training_validates_and_saves_the_average(synthetic_dataset, tmp_path, monkeypatch):
    import captioner.training

    validated = []  # the weights each validation decoded with

    def recording_evaluate(model, *args, **kwargs):
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    evaluate = captioner.training.evaluate
    monkeypatch.setattr(captioner.training, "evaluate", recording_evaluate)
    out = tmp_path / "run"
    assert train(synthetic_dataset, out, "--epochs", "1", "--ema-decay", "0.5") == 0
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert last["ema_updates"] == best["ema_updates"] == 3  # 48 images, batch 16
    average, raw = last["model"], last["raw_model"]
    assert average.keys() == raw.keys()
    different = [k for k in raw if not torch.equal(average[k], raw[k])]
    assert any(k.startswith("decoder.") for k in different) and any(k.startswith("encoder.grid_convs") for k in different)
    frozen = [k for k in raw if k.startswith("encoder.prefix.")]
    assert frozen and not set(frozen) & set(different)  # the average of a frozen weight is that weight
    # best.pt (epoch 1, the only one) holds the average, which is what caption/evaluate load.
    assert all(torch.equal(best["model"][k], average[k]) for k in average)
    model, _, _ = load_model(out / "best.pt")
    assert all(torch.equal(v, average[k]) for k, v in model.state_dict().items())
    assert len(validated) == 1 and all(torch.equal(validated[0][k], average[k]) for k in average)
