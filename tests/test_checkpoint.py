import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint, load_model, remove_stale_temporaries, save_checkpoint, \
    tokenizer_payload
from captioner.config import RunConfig
from captioner.decoding import decode
from captioner.errors import CheckpointError, CheckpointWriteError
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
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # an image given as the checkpoint
    with pytest.raises(CheckpointError,
                       match=r"photo.jpg is not a PyTorch checkpoint.*starts with b'\\xff\\xd8") as caught:
        load_checkpoint(tmp_path / "photo.jpg")
    assert "weights_only" not in str(caught.value)  # no advice to load an unknown file unsafely
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):  # read, as torch's older format
        load_checkpoint(tmp_path / "legacy.pt")
    data = (tmp_path / "other.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cut.pt \\({len(data) // 2} bytes\\).*truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


# Each runs in a child process: one under a file-size limit (the kernel refuses writes past it with EFBIG,
# as a full disk refuses them with ENOSPC), one as an unprivileged user in a read-only folder.
WRITE_UNDER_LIMIT = """
import resource, signal, sys, torch
from captioner.checkpoint import save_checkpoint
from captioner.errors import CheckpointWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(1 << 16)}, "config": {}})
except CheckpointWriteError as exc:
    print(exc)
    sys.exit(1)
"""

WRITE_AS_NOBODY = """
import io, os, sys, torch
from captioner.checkpoint import save_checkpoint
from captioner.errors import CheckpointWriteError
torch.save({}, io.BytesIO())  # finish torch's lazy imports while the source tree is still readable
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)  # root writes anywhere; an ordinary user cannot write into a read-only folder
try:
    save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(4)}, "config": {}})
except CheckpointWriteError as exc:
    print(exc)
    sys.exit(1)
"""


def _run_child(script, *args):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_full_disk_is_a_clear_error_and_keeps_previous_checkpoint(tmp_path):
    _tiny_checkpoint(tmp_path / "last.pt")  # written before the child's 64 KB limit applies
    before = (tmp_path / "last.pt").read_bytes()
    proc = _run_child(WRITE_UNDER_LIMIT, tmp_path / "last.pt")
    assert proc.returncode == 1, proc.stderr
    assert "cannot write checkpoint" in proc.stdout and "File too large" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_read_only_folder_is_a_clear_error_and_keeps_previous_checkpoint(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    _tiny_checkpoint(folder / "last.pt")
    before = (folder / "last.pt").read_bytes()
    tmp_path.chmod(0o755)
    folder.chmod(0o555)
    (folder / "last.pt").chmod(0o644)
    try:
        proc = _run_child(WRITE_AS_NOBODY, folder / "last.pt")
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write checkpoint" in proc.stdout and "Permission denied" in proc.stdout
    assert (folder / "last.pt").read_bytes() == before


def test_failure_at_fsync_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """Some filesystems report a full disk only when the data is flushed."""
    _tiny_checkpoint(tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        save_checkpoint(tmp_path / "m.pt", {"model": {}, "config": {}})
    assert (tmp_path / "m.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"torn")
    (tmp_path / "last.pt").write_bytes(b"kept")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


def test_checkpoint_from_before_the_cut_trunk_still_loads(tmp_path):
    """A checkpoint whose config predates trunk_stages & co. built the whole trunk with no grid convolutions, no
    grid summary and the bag-of-words head on the mean memory token: that model, not today's defaults, loads."""
    from captioner.config import MODEL_KEYS_BEFORE_THEY_EXISTED

    tokenizer = Tokenizer.train(["a red circle on the left", "two blue squares at the top"] * 5)
    old_model = tiny_model_config(vocab_size=tokenizer.vocab_size, bow_weight=0.2, trainable_layers=2,
                                  **MODEL_KEYS_BEFORE_THEY_EXISTED)
    cfg = RunConfig(model=old_model).to_dict()
    for key in MODEL_KEYS_BEFORE_THEY_EXISTED:
        del cfg["model"][key]
    torch.manual_seed(0)
    model = Captioner(old_model).eval()
    save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "config": cfg,
                                          "tokenizer": tokenizer_payload(tokenizer)})
    loaded, _, loaded_cfg = load_model(tmp_path / "old.pt")
    assert loaded_cfg.model.trunk_stages == 5 and loaded_cfg.model.grid_convs == 0
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode(images), model.encode(images))


def _first_step_logits(model, images: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of the first caption token: what every decoding setting starts from."""
    from captioner.text import BOS_ID

    with torch.inference_mode():
        return model(images, torch.full((images.shape[0], 1), BOS_ID, dtype=torch.long))[:, 0]


def test_export_keeps_what_captioning_needs_and_resume_refuses_it(trained_run, tmp_path, capsys):
    from captioner.cli import main

    source = trained_run / "best.pt"
    assert main(["export", str(source), str(tmp_path / "model.pt")]) == 0
    assert main(["export", str(source), str(tmp_path / "half.pt"), "--fp16"]) == 0
    full, exported, half = (load_checkpoint(p) for p in (source, tmp_path / "model.pt", tmp_path / "half.pt"))
    assert "optimizer" in full and "optimizer" not in exported and "rng" not in exported
    assert exported["exported"] == {"from": str(source), "weights": "float32"}
    assert exported["metrics"] == full["metrics"] and exported["epoch"] == full["epoch"]
    sizes = {p: p.stat().st_size for p in (source, tmp_path / "model.pt", tmp_path / "half.pt")}
    moments = sum(t.numel() * t.element_size() for state in full["optimizer"]["state"].values()
                  for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert sizes[source] - sizes[tmp_path / "model.pt"] > 0.95 * moments  # AdamW's moments per trained weight go
    assert sizes[tmp_path / "half.pt"] < 0.6 * sizes[tmp_path / "model.pt"]
    assert all(t.dtype == torch.float16 for t in half["model"].values() if t.is_floating_point())
    assert main(["export", str(tmp_path / "half.pt"), str(tmp_path / "again.pt")]) == 0  # without --fp16: fp32
    again = load_checkpoint(tmp_path / "again.pt")
    assert again["exported"]["weights"] == "float32"
    assert all(t.dtype == torch.float32 for t in again["model"].values() if t.is_floating_point())

    original, tokenizer, _ = load_model(source)
    same, same_tokenizer, _ = load_model(tmp_path / "model.pt")
    halved, _, _ = load_model(tmp_path / "half.pt")
    assert same_tokenizer.model_bytes == tokenizer.model_bytes
    assert all(p.dtype == torch.float32 for p in halved.parameters())  # fp16 in the file, fp32 once loaded
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        before = decode(original, original.encode(images), beam_size=2, max_len=10)
        after = decode(same, same.encode(images), beam_size=2, max_len=10)
    assert [[h.tokens for h in b] for b in before] == [[h.tokens for h in a] for a in after]
    reference = _first_step_logits(original, images)
    assert torch.allclose(_first_step_logits(halved, images), reference, atol=0.05 * float(reference.abs().max()))

    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "model.pt"), "--device", "cpu"]) == 2
    assert "written by `captioner export`" in capsys.readouterr().err


def test_export_never_replaces_a_training_checkpoint_but_may_replace_an_export(trained_run, tmp_path, capsys):
    from captioner.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = (run / "last.pt").read_bytes()
    assert main(["export", str(run / "best.pt"), str(run / "last.pt")]) == 2
    assert (f"export: {run / 'last.pt'} is a training checkpoint (it holds the optimizer state that "
            "`train --resume` continues from); give another file") in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == last
    assert main(["export", str(run / "best.pt"), str(tmp_path / "model.pt")]) == 0
    assert main(["export", str(run / "last.pt"), str(tmp_path / "model.pt"), "--fp16"]) == 0  # an export: replaced
    assert load_checkpoint(tmp_path / "model.pt")["exported"]["weights"] == "float16"


def test_export_refuses_its_own_source_and_weights_beyond_fp16(tmp_path, capsys):
    from captioner.cli import main

    model, tokenizer = _tiny_checkpoint(tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.pt")]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    state = model.state_dict()
    state["decoder.out.weight" if "decoder.out.weight" in state else next(iter(state))] *= 1e6
    save_checkpoint(tmp_path / "big.pt", {"model": state, "config": load_checkpoint(tmp_path / "m.pt")["config"],
                                          "tokenizer": tokenizer_payload(tokenizer)})
    assert main(["export", str(tmp_path / "big.pt"), str(tmp_path / "half.pt"), "--fp16"]) == 2
    assert "beyond fp16's range" in capsys.readouterr().err and not (tmp_path / "half.pt").exists()
    assert main(["export", str(tmp_path / "big.pt"), str(tmp_path / "full.pt")]) == 0
