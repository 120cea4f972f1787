"""scripts/ablation.py end to end on the synthetic scenes laid out as Flickr8k: two tiny variants trained two at
a time and scored on dev with beam 3, and a broken variant that is reported without stopping the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from captioner.data import load_coco

REPO = Path(__file__).resolve().parents[1]


def synthetic_as_flickr8k(dataset, root: Path) -> Path:
    """The synthetic train and val scenes as a Flickr8k folder: token file, split lists, linked images."""
    text, images = root / "Flickr8k_text", root / "Flicker8k_Dataset"
    text.mkdir(parents=True)
    images.mkdir()
    tokens = []
    for split, captions, folder in (("train", dataset.train_captions, dataset.train_images),
                                    ("dev", dataset.val_captions, dataset.val_images)):
        records = load_coco(captions, folder)
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{r.path.name}\n" for r in records))
        for r in records:
            (images / r.path.name).symlink_to(r.path)
            tokens += [f"{r.path.name}#{i}\t{c}\n" for i, c in enumerate(r.captions)]
    (text / "Flickr8k.token.txt").write_text("".join(tokens))
    return root


def test_two_variants_in_parallel_and_a_broken_one(synthetic_dataset, tmp_path):
    root = synthetic_as_flickr8k(synthetic_dataset, tmp_path / "flickr8k")
    tiny = {"model": {"dim": 32, "heads": 4, "decoder_layers": 1, "dropout": 0.0},
            "data": {"image_size": 64}, "train": {"batch_size": 16, "vocab_size": 200}}
    (tmp_path / "base.json").write_text(json.dumps(tiny))
    (tmp_path / "other.json").write_text(json.dumps(dict(tiny, train={**tiny["train"], "ema_decay": 0.5})))
    variants = {"small_images": ["--image-size", "32", "--feature-cache", "cache"],
                "other_config": ["--config", "other.json", "--augment", "--hflip"],
                "broken": ["--no-such-flag"]}
    (tmp_path / "variants.json").write_text(json.dumps(variants))
    out = tmp_path / "ablation"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ablation.py"), "--dataset-root", str(root),
                           "--out", str(out), "--base", str(tmp_path / "base.json"), "--variants",
                           str(tmp_path / "variants.json"), "--parallel", "2", "--epochs", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one variant failed
    # the runs start where the script did: a relative path among a variant's flags means the same there
    assert (tmp_path / "cache").is_dir() and not (REPO / "cache").exists()

    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(results) == ["small_images", "other_config", "broken"]
    for name in ("small_images", "other_config"):
        r = results[name]
        assert r["status"] == "ok", r
        assert all(0.0 <= r["dev_beam3"][f"Bleu_{n}"] <= 1.0 for n in range(1, 5))
        assert r["dev_beam3"]["beam_size"] == 3 and r["dev_beam3"]["num_images"] == 8
        assert (r["best_epoch"], r["epochs_run"]) == (1, 1) and r["train_seconds"] > 0
        assert r["device"].startswith("cpu")
    assert results["small_images"]["overrides"] == ["--image-size", "32", "--feature-cache", "cache"]
    assert Path(results["other_config"]["config"]) == tmp_path / "other.json"
    assert json.loads((out / "other_config" / "config.json").read_text())["train"]["ema_decay"] == 0.5
    assert json.loads((out / "small_images" / "config.json").read_text())["data"]["image_size"] == 32
    assert results["broken"]["status"] == "failed" and "--no-such-flag" in results["broken"]["train_log_tail"]
    assert "dev_beam3" not in results["broken"]

    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| variant |") and table in proc.stdout
    assert "| small_images | `--image-size 32 --feature-cache cache` |" in table and "| broken |" in table
    assert "--no-such-flag" in proc.stderr  # the failed variant's log tail


def test_dry_run_prints_the_commands_and_max_epochs_caps_only_longer_runs(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"train": {"epochs": 30}}))
    (tmp_path / "short.json").write_text(json.dumps({"train": {"epochs": 4}}))
    (tmp_path / "variants.json").write_text(json.dumps({"base": [], "short": ["--config", "short.json"],
                                                        "flagged": ["--epochs", "5", "--hflip"]}))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ablation.py"), "--dataset-root", "ROOT", "--out",
                           "OUT", "--base", str(tmp_path / "base.json"), "--variants", str(tmp_path / "variants.json"),
                           "--max-epochs", "6", "--dry-run", "--", "--workers", "2"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    train = [line.split() for line in proc.stdout.splitlines() if "scripts/train.py " in line]
    assert [c[c.index("--config") + 1] for c in train] == [str(tmp_path / n) for n in ("base.json", "short.json",
                                                                                      "base.json")]
    assert [c[-2:] for c in train] == [["--epochs", "6"], ["--epochs", "4"], ["--epochs", "5"]]
    assert all(c[c.index("--no-progress") + 1 :][-4:-2] == ["--workers", "2"] for c in train)
    # variants with the same trunk pre-training share one trunk, trained once
    assert all(c[c.index("--trunk-pretrain-cache") + 1] == f"{tmp_path}/OUT/pretrained_trunks" for c in train)
    # absolute, in the commands printed and the runs' logs
    assert all(c[c.index("--root") + 1] == f"{tmp_path}/ROOT" for c in train)
    evaluate = [line.split() for line in proc.stdout.splitlines() if "scripts/evaluate.py " in line]
    assert [c[c.index("--checkpoint") + 1] for c in evaluate] == [f"{tmp_path}/OUT/{n}/best.pt"
                                                                  for n in ("base", "short", "flagged")]
    assert all(c[c.index("--beam-size") + 1] == "3" and c[c.index("--split") + 1] == "dev" for c in evaluate)
    cut = proc.args.index("--")
    separate = subprocess.run([*proc.args[:cut], "--separate-pretraining", *proc.args[cut:]], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
    assert separate.returncode == 0 and "--trunk-pretrain-cache" not in separate.stdout


def test_every_shipped_variant_is_a_valid_train_configuration():
    """A typo in a variants file must fail here, not minutes into a lent GPU's time."""
    import pytest

    from captioner.cli import build_parser
    from captioner.train_cli import config_from_args

    files = sorted((REPO / "configs").glob("flickr8k_ablation*.json"))
    assert len(files) >= 3
    for variants_file in files:
        for name, flags in json.loads(variants_file.read_text()).items():
            config = REPO / "configs" / "flickr8k_seed_baseline.json"
            if "--config" in flags:  # relative to the variants file, as ablation.py reads it
                at = flags.index("--config") + 1
                flags = [*flags[:at], str(variants_file.parent / flags[at]), *flags[at + 1:]]
            try:
                args = build_parser().parse_args(["train", "--config", str(config), *flags])
            except SystemExit:
                pytest.fail(f"{variants_file.name}: variant {name!r} has flags train does not take: {flags}")
            cfg = config_from_args(args)
            assert cfg.train.epochs >= 1, (variants_file.name, name)


def test_pretraining_rounds_keep_their_meaning_over_the_shipped_recipe():
    """Rounds 3 to 6 are run over configs/flickr8k_scratch.json, which now pre-trains the trunk for 40 epochs:
    each variant must still pre-train exactly as its name in the README's tables says (none for the recipe rows
    of round 3, N epochs for ptN) and train self-critically only where it says so (scstN: N epochs, lrX: that
    learning rate, from_last: from the last cross-entropy epoch), or a rerun would quietly measure something else."""
    import re

    from captioner.cli import build_parser
    from captioner.train_cli import config_from_args

    recipe = REPO / "configs" / "flickr8k_scratch.json"
    shipped = config_from_args(build_parser().parse_args(["train", "--config", str(recipe)]))
    assert shipped.train.trunk_pretrain_epochs == 40
    for round_file in ("flickr8k_ablation_round3.json", "flickr8k_ablation_round4.json",
                       "flickr8k_ablation_round5.json", "flickr8k_ablation_round6.json"):
        for name, flags in json.loads((REPO / "configs" / round_file).read_text()).items():
            cfg = config_from_args(build_parser().parse_args(["train", "--config", str(recipe), *flags]))
            named = re.match(r"pt(\d+)", name)
            assert cfg.train.trunk_pretrain_epochs == (int(named.group(1)) if named else 0), (round_file, name)
            scst, lr = re.search(r"scst(\d+)", name), re.search(r"_lr([\d.e-]+)", name)
            assert cfg.train.scst_epochs == (int(scst.group(1)) if scst else 0), (round_file, name)
            if scst:
                assert cfg.train.scst_lr == (float(lr.group(1)) if lr else shipped.train.scst_lr), (round_file, name)
                assert cfg.train.scst_start == ("last" if "from_last" in name else "best"), (round_file, name)
