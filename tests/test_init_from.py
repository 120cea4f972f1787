"""`train --init-from CHECKPOINT`: a new run starting from another run's model (captioner/init_from.py)."""

from __future__ import annotations

import json

import torch

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.config import RunConfig
from captioner.init_from import resplit_trunk
from conftest import TINY


def data_flags(d, out) -> list[str]:
    return ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
            str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
            "--out", str(out), *TINY]


def weights(path, resplit: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The float tensors of a checkpoint's model (with `resplit`, re-split as resplit_trunk does), less the
    BatchNorm running statistics of trained stages, which every training batch moves whatever the learning rate."""
    state = load_checkpoint(path)["model"]
    state = resplit_trunk(state, *resplit) if resplit else state
    return {k: v.float() for k, v in state.items()
            if v.is_floating_point() and not ("running_" in k and "prefix" not in k)}


def test_a_run_started_from_a_checkpoint_keeps_its_model_tokenizer_and_weights(synthetic_dataset, trained_run,
                                                                             tmp_path, caplog):
    source = trained_run / "best.pt"
    assert main(["export", str(source), str(tmp_path / "model.pt"), "--fp16"]) == 0
    out = tmp_path / "run"
    # Another width and vocabulary in the flags' defaults would make another model: the checkpoint's wins. With a
    # learning rate of ~0 the one epoch changes nothing, so the new run's weights are the exported ones.
    assert main([*data_flags(synthetic_dataset, out), "--init-from", str(tmp_path / "model.pt"), "--epochs", "1",
                 "--lr", "1e-12", "--trunk-pretrain-epochs", "3", "--dim", "32"]) == 0
    started, saved = load_checkpoint(source), load_checkpoint(out / "last.pt")
    assert torch.equal(saved["tokenizer"], started["tokenizer"])
    assert RunConfig.from_saved(saved["config"], "x").model == RunConfig.from_saved(started["config"], "x").model
    config = RunConfig.load(out / "config.json")
    assert config.train.init_from == str(tmp_path / "model.pt") and config.train.trunk_pretrain_epochs == 0
    assert not (out / "trunk_pretrained.pt").exists()
    expected, got = weights(tmp_path / "model.pt"), weights(out / "last.pt")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-3), name
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_trainable_layers_may_change_and_the_trunk_is_resplit(synthetic_dataset, trained_run, tmp_path):
    source = trained_run / "best.pt"
    saved_model = RunConfig.from_saved(load_checkpoint(source)["config"], "x").model
    changed = 0 if saved_model.trainable_layers else 1
    out = tmp_path / "frozen"
    assert main([*data_flags(synthetic_dataset, out), "--init-from", str(source), "--epochs", "1", "--lr", "1e-12",
                 "--trainable-layers", str(changed), "--dropout", "0"]) == 0
    model = RunConfig.load(out / "config.json").model
    assert model.trainable_layers == changed and model.dropout == 0 and model.dim == saved_model.dim
    split = saved_model.trunk_stages - saved_model.trainable_layers
    expected = weights(source, (split, saved_model.trunk_stages - changed))
    got = weights(out / "last.pt")
    assert expected.keys() == got.keys()
    before, after = (set(load_checkpoint(p)["model"]) for p in (source, out / "last.pt"))
    assert before != after and len(before) == len(after)  # the same tensors, some of them under new names
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-3), name


def test_resplit_trunk_moves_stages_between_prefix_and_suffix():
    state = {"encoder.prefix.0.0.weight": 0, "encoder.prefix.1.0.conv1.weight": 1, "encoder.suffix.0.1.bn2.bias": 2,
             "encoder.suffix.1.0.conv1.weight": 3, "decoder.out.weight": 4}
    assert resplit_trunk(state, 2, 0) == {"encoder.suffix.0.0.weight": 0, "encoder.suffix.1.0.conv1.weight": 1,
                                          "encoder.suffix.2.1.bn2.bias": 2, "encoder.suffix.3.0.conv1.weight": 3,
                                          "decoder.out.weight": 4}
    assert resplit_trunk(resplit_trunk(state, 2, 3), 3, 2) == state
    assert resplit_trunk(state, 2, 2) is state


def test_settings_that_would_change_the_model_are_refused_by_name(synthetic_dataset, trained_run, tmp_path, capsys):
    code = main([*data_flags(synthetic_dataset, tmp_path / "run"), "--init-from", str(trained_run / "best.pt"),
                 "--dim", "48", "--decoder-layers", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--decoder-layers 2 (the model's: 1)" in err and "--dim 48 (the model's: 32)" in err
    assert main([*data_flags(synthetic_dataset, tmp_path / "run"), "--init-from", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = tmp_path / "wide.json"  # a --config file's model section counts as given, as flags do
    config.write_text(json.dumps({"model": {"max_len": 17}}))
    assert main([*data_flags(synthetic_dataset, tmp_path / "run"), "--config", str(config), "--init-from",
                 str(trained_run / "best.pt")]) == 2
    assert "--max-len 17 (the model's: " in capsys.readouterr().err
    saved_bow = RunConfig.from_saved(load_checkpoint(trained_run / "best.pt")["config"], "x").model.bow_weight
    other_bow = "0" if saved_bow > 0 else "0.5"  # a bag-of-words head added or removed: refused
    assert main([*data_flags(synthetic_dataset, tmp_path / "run"), "--init-from", str(trained_run / "best.pt"),
                 "--bow-weight", other_bow]) == 2
    assert "--bow-weight" in capsys.readouterr().err


def test_a_config_files_trainable_layers_and_extract_features_follow_the_same_rules(synthetic_dataset, trained_run,
                                                                                  tmp_path):
    config = tmp_path / "frozen.json"
    config.write_text(json.dumps({"model": {"trainable_layers": 0, "dropout": 0.0}, "data": {"image_size": 48}}))
    flags = data_flags(synthetic_dataset, tmp_path / "features")
    at = flags.index("--image-size")
    del flags[at:at + 2]
    flags[0] = "extract-features"
    assert main([*flags, "--config", str(config), "--init-from", str(trained_run / "best.pt")]) == 0
    saved = RunConfig.load(tmp_path / "features" / "config.json")
    assert (saved.model.trainable_layers, saved.model.dropout, saved.data.image_size) == (0, 0.0, 48)
    assert saved.model.dim == 32 and any((tmp_path / "features" / "feature_cache").iterdir())


def test_self_critical_epochs_alone_start_from_the_checkpoints_model(synthetic_dataset, trained_run, tmp_path):
    """--epochs 0 --scst-epochs 1: the self-critical phase of a model trained elsewhere, at the image size it was
    trained at (64 px; the default is 160) when --image-size is not given."""
    out = tmp_path / "scst"
    flags = data_flags(synthetic_dataset, out)
    at = flags.index("--image-size")
    del flags[at:at + 2]
    assert main([*flags, "--init-from", str(trained_run / "best.pt"), "--epochs", "0", "--scst-epochs", "1",
                 "--scst-samples", "2"]) == 0
    assert RunConfig.load(out / "config.json").data.image_size == 64 != RunConfig().data.image_size
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in log] == [(1, "scst")]
    assert 0.0 <= log[0]["scst_reward"] <= 1.0 and log[0]["images"] == 48
