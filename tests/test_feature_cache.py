"""The on-disk cache of frozen-trunk features: epochs after the first decode no image; a changed image size,
trunk or dataset never reuses a cache built for something else."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import captioner.data.dataset as dataset_module
import captioner.training as training
from captioner.config import RunConfig
from captioner.feature_cache import FeatureStore


def test_store_round_trip_keys_and_torn_meta(tmp_path):
    key = {"prefix": "abc", "image_size": 64}
    store = FeatureStore.open(tmp_path, key, 5, (2, 3, 3))
    assert len(store) == 0 and not store.has(3)
    values = torch.randn(2, 2, 3, 3)
    store.put([3, 0], values)
    again = FeatureStore.open(tmp_path, key, 5, (2, 3, 3))  # same key: same folder, rows kept
    assert again.folder == store.folder and len(again) == 2 and again.has(0) and again.has(3)
    assert torch.equal(again.get(3), values[0].half())
    other = FeatureStore.open(tmp_path, {**key, "image_size": 48}, 5, (2, 3, 3))
    assert other.folder != store.folder and len(other) == 0
    (store.folder / "meta.json").write_text(json.dumps({"torn": True}))
    rebuilt = FeatureStore.open(tmp_path, key, 5, (2, 3, 3))
    assert rebuilt.folder == store.folder and len(rebuilt) == 0
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path, {**key, "prefix": "new"}, 5, (2, 3, 3), create=False)


def config(dataset, out, cache, **train):
    cfg = RunConfig()
    d = dataset
    cfg.data.dataset, cfg.data.image_size, cfg.data.feature_cache = "coco", 64, str(cache)
    cfg.data.train_captions, cfg.data.train_images = str(d.train_captions), str(d.train_images)
    cfg.data.val_captions, cfg.data.val_images = str(d.val_captions), str(d.val_images)
    cfg.model.dim, cfg.model.heads, cfg.model.decoder_layers = 32, 4, 1
    cfg.train.out, cfg.train.batch_size, cfg.train.device, cfg.train.vocab_size = str(out), 16, "cpu", 200
    cfg.train.epochs = 2
    cfg.data.cache_images = False  # so every decode counted comes from the feature store missing a row
    for key, value in train.items():
        section = "model" if hasattr(cfg.model, key) else "data" if hasattr(cfg.data, key) else "train"
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture
def decodes(monkeypatch):
    """Image decodes per training epoch (calibration and validation not counted)."""
    calls, per_epoch = [], []
    real_load, real_epoch = dataset_module.load_image_tensor, training.train_one_epoch

    def counting_load(path, image_size):
        calls.append(path)
        return real_load(path, image_size)

    def counting_epoch(*args, **kwargs):
        before = len(calls)
        result = real_epoch(*args, **kwargs)
        per_epoch.append(len(calls) - before)
        return result

    monkeypatch.setattr(dataset_module, "load_image_tensor", counting_load)
    monkeypatch.setattr(training, "train_one_epoch", counting_epoch)
    return per_epoch


def test_second_epoch_decodes_no_image_and_changes_invalidate(synthetic_dataset, tmp_path, decodes):
    cache = tmp_path / "cache"
    first = training.fit(config(synthetic_dataset, tmp_path / "a", cache), progress=False)
    assert decodes == [48, 0]
    assert len(list(cache.iterdir())) == 2  # train and val splits

    # The same run again (same seed: same random trunk and calibration) finds everything cached.
    again = training.fit(config(synthetic_dataset, tmp_path / "b", cache), progress=False)
    assert decodes[2:] == [0, 0]
    assert again["history"][-1]["train_loss"] == pytest.approx(first["history"][-1]["train_loss"], rel=1e-6)

    # Another image size or another trunk is another cache: built afresh, never the old one reused.
    training.fit(config(synthetic_dataset, tmp_path / "c", cache, image_size=48), progress=False)
    assert decodes[4:] == [48, 0]
    training.fit(config(synthetic_dataset, tmp_path / "d", cache, trainable_layers=1), progress=False)
    assert decodes[6:] == [48, 0]
    assert len(list(cache.iterdir())) == 6


def test_cache_off_with_augmentation_or_a_fully_trained_trunk(synthetic_dataset, tmp_path, decodes):
    for name, extra in (("aug", {"augment": True}), ("full", {"trunk_stages": 5, "trainable_layers": 5}), ("off", {})):
        cache = "off" if name == "off" else tmp_path / "cache"
        cfg = config(synthetic_dataset, tmp_path / name, cache, epochs=1, **extra)
        training.fit(cfg, progress=False)
    assert decodes == [48, 48, 48]
    assert not (tmp_path / "cache").exists()


def test_extract_features_then_train_with_workers(synthetic_dataset, tmp_path):
    from captioner.cli import main

    cache = tmp_path / "cache"
    cfg = config(synthetic_dataset, tmp_path / "run", cache, workers=2)
    cfg.save(tmp_path / "config.json")
    assert main(["extract-features", "--config", str(tmp_path / "config.json"), "--no-progress"]) == 0
    stores = sorted(cache.iterdir())
    filled = [int(np.load(folder / "filled.npy").sum()) for folder in stores]
    assert sorted(filled) == [8, 48]
    # Training with the same flags (and DataLoader worker processes reading the memory-mapped rows) reuses them.
    assert main(["train", "--config", str(tmp_path / "config.json"), "--no-progress", "--epochs", "1"]) == 0
    assert sorted(cache.iterdir()) == stores


def test_evaluate_reads_the_validation_features_its_training_run_cached(synthetic_dataset, tmp_path, monkeypatch,
                                                                       capsys):
    from captioner.cli import main

    training.fit(config(synthetic_dataset, tmp_path / "run", "auto", epochs=1), progress=False)
    args = ["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--dataset", "coco", "--captions",
            str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images), "--device", "cpu"]
    decoded = []
    real_load = dataset_module.load_image_tensor
    monkeypatch.setattr(dataset_module, "load_image_tensor", lambda path, size: decoded.append(path) or real_load(path, size))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 8
    assert decoded == []  # every validation image came from the cache
    shutil.rmtree(tmp_path / "run" / "feature_cache")
    assert main(args) == 0
    assert len(decoded) == 8  # without it, every JPEG is decoded
