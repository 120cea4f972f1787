import os
import pickle

import pytest
import torch

from captioner.checkpoint import load_checkpoint, load_model, save_checkpoint, tokenizer_payload
from captioner.config import RunConfig
from captioner.decoding import decode
from captioner.errors import CheckpointError
from captioner.text import Tokenizer
from conftest import tiny_model_config
from captioner.models.captioner import Captioner


def _tiny_checkpoint(path):
    tokenizer = Tokenizer.train(["a red circle on the left", "two blue squares at the top"] * 5)
    cfg = RunConfig(model=tiny_model_config(vocab_size=tokenizer.vocab_size))
    torch.manual_seed(0)
    model = Captioner(cfg.model).eval()
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(),
                           "tokenizer": tokenizer_payload(tokenizer)})
    return model, tokenizer


def test_round_trip_reproduces_captions(tmp_path):
    model, tokenizer = _tiny_checkpoint(tmp_path / "m.pt")
    loaded, loaded_tokenizer, cfg = load_model(tmp_path / "m.pt")
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        before = decode(model, model.encode(images), beam_size=2, max_len=10)
        after = decode(loaded, loaded.encode(images), beam_size=2, max_len=10)
    assert [[h.tokens for h in b] for b in before] == [[h.tokens for h in a] for a in after]
    assert loaded_tokenizer.model_bytes == tokenizer.model_bytes
    assert cfg.model.vocab_size == tokenizer.vocab_size


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(), "config": {}}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_corrupt_missing_and_foreign_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _tiny_checkpoint(tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path / "m.pt", {"model": {}, "config": {}})
    assert (tmp_path / "m.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
