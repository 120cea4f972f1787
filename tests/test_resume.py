"""A training run killed with SIGKILL at arbitrary points (including in the middle of writing a checkpoint) or
stopped with SIGTERM, and resumed each time, ends with the same weights, bit for bit, as a run that was never
interrupted: the trained weights and their moving average (--ema-decay) alike."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint
from conftest import TINY

# Runs the CLI in a process that kills itself (SIGKILL, no cleanup of any kind) in the middle of writing its
# KILL_AT_SAVE-th checkpoint: when the data reaches fsync, the file is cut to half its length and the process
# dies, leaving a torn temporary file next to the last good checkpoint.
DIE_DURING_SAVE = """
import os, signal, stat, sys
kill_at, saves, real_fsync = int(os.environ["KILL_AT_SAVE"]), [0], os.fsync
def tear_then_die(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode):  # a checkpoint file, not the folder synced after the rename
        saves[0] += 1
        if saves[0] == kill_at:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)
os.fsync = tear_then_die
from captioner.cli import main
sys.exit(main(sys.argv[1:]))
"""

def train_command(dataset, out: Path, resume: bool, checkpoint_every: int = 1) -> list[str]:
    d = dataset
    args = ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
            str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
            "--out", str(out), "--epochs", "2", *TINY, "--batch-size", "8", "--checkpoint-every",
            str(checkpoint_every), "--deterministic", "--dropout", "0.1", "--ema-decay", "0.9"]
    if resume:
        args += ["--resume", str(out / "last.pt")]
    return args


def start(args: list[str], kill_at_save: int | None = None, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if kill_at_save is None:
        command = [sys.executable, "-m", "captioner.cli", *args]
    else:
        env["KILL_AT_SAVE"] = str(kill_at_save)
        command = [sys.executable, "-c", DIE_DURING_SAVE, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def start_and_wait_for_a_save(args: list[str], checkpoint: Path) -> subprocess.Popen:
    """Start a run and return once it has replaced `checkpoint` (so it is past start-up, inside training)."""
    before = checkpoint.stat().st_mtime_ns
    proc = start(args)
    deadline = time.monotonic() + 300
    while checkpoint.stat().st_mtime_ns == before:
        assert proc.poll() is None, f"the run ended before writing a checkpoint: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint written within 300 s"
        time.sleep(0.02)
    return proc


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """"model" holds the moving average of the weights (--ema-decay), "raw_model" the trained weights."""
    return load_checkpoint(path)[key]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:5]}"


def batches_done(path: Path, per_epoch: int = 6) -> int:
    """How far the checkpoint is into the run (48 training images, batch 8: 6 batches per epoch)."""
    payload = load_checkpoint(path)
    if payload["epoch_batches"]:  # inside `epoch`
        return (payload["epoch"] - 1) * per_epoch + payload["epoch_batches"]
    return payload["epoch"] * per_epoch  # `epoch` complete


def test_sigkill_at_random_points_then_resume_gives_identical_weights(synthetic_dataset, tmp_path):
    # The reference writes no mid-epoch checkpoints: saving must not change what is trained either.
    reference = tmp_path / "reference"
    code, err = finish(start(train_command(synthetic_dataset, reference, resume=False, checkpoint_every=0)))
    assert code == 0, err

    out = tmp_path / "interrupted"
    # 1. Killed while writing its 3rd checkpoint (mid-epoch 1): the 2nd survives intact.
    code, _ = finish(start(train_command(synthetic_dataset, out, resume=False), kill_at_save=3))
    assert code == -signal.SIGKILL
    assert batches_done(out / "last.pt") == 2
    assert list(out.glob(".last.pt.*.tmp")), "the torn temporary file should be left behind by the kill"

    # 2. Resumed, then killed while writing best.pt at the end of epoch 1 (saves: batches 3, 4, 5, then best.pt).
    code, _ = finish(start(train_command(synthetic_dataset, out, resume=True), kill_at_save=4))
    assert code == -signal.SIGKILL
    assert batches_done(out / "last.pt") == 5
    assert not (out / "best.pt").exists()

    # 3. SIGTERM (what a cluster scheduler sends before preempting) once training is under way, i.e. once the
    # resumed run has written a checkpoint of its own: it finishes its batch, saves, and exits 128 + 15.
    proc = start_and_wait_for_a_save(train_command(synthetic_dataset, out, resume=True), out / "last.pt")
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert batches_done(out / "last.pt") > 5
    printed = re.search(r"continue with `captioner (train --resume [^`]+)`", err)
    assert printed, err

    # 4. SIGKILL at a random instant (seeded, so a failure can be replayed) within half a second of the resumed
    # run's first save: in the middle of a training step, a save, or between them.
    proc = start_and_wait_for_a_save(train_command(synthetic_dataset, out, resume=True), out / "last.pt")
    time.sleep(random.Random(1234).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    code, err = finish(proc)
    assert code == -signal.SIGKILL, err

    # 5. The last resume, the command the SIGTERM message printed and nothing more, runs the same run to its end:
    # in its own folder, for its own epochs, with its own settings (not the defaults of flags left out)
    code, err = finish(start(printed.group(1).split(), cwd=tmp_path))
    assert code == 0, err
    assert not (tmp_path / "runs").exists()

    for name in ("last.pt", "best.pt"):
        for key in ("model", "raw_model"):
            assert_same_weights(weights(out / name, key), weights(reference / name, key))
        assert load_checkpoint(out / name)["ema_updates"] == load_checkpoint(reference / name)["ema_updates"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    reference_log = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("train_loss", "val_Bleu_4", "steps", "images"):
        assert [r[key] for r in log] == [r[key] for r in reference_log], key
    assert not list(out.glob(".*.tmp")), "stale temporary files should be cleaned up by the resumed run"


def test_resume_after_a_kill_between_the_final_checkpoint_and_its_log_restores_the_log(synthetic_dataset, tmp_path):
    """last.pt of the final epoch written, log.jsonl not yet: the resumed run has no epoch left to train, and
    still leaves a log that matches last.pt."""
    from captioner.cli import main
    from conftest import TINY

    d = synthetic_dataset
    args = ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
            str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
            "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    assert main(args) == 0
    log_path = tmp_path / "run" / "log.jsonl"
    full = log_path.read_text()
    log_path.write_text("")  # what the kill left: the epoch's record is in last.pt only
    assert main(args + ["--resume", str(tmp_path / "run" / "last.pt")]) == 0
    assert log_path.read_text() == full


def test_sigterm_to_the_whole_process_group_with_loader_workers_stops_cleanly(synthetic_dataset, tmp_path):
    """Cluster schedulers (Slurm's time limit, scancel) and Ctrl-C signal every process of the job, DataLoader
    workers included: the run must still finish its batch, save and exit as for a SIGTERM to the main process,
    not die of a killed worker."""
    out = tmp_path / "run"
    args = train_command(synthetic_dataset, out, resume=False) + ["--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own process group
    deadline = time.monotonic() + 300
    while not (out / "last.pt").is_file():
        assert proc.poll() is None, f"the run ended before writing a checkpoint: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint written within 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert batches_done(out / "last.pt") >= 1


def test_a_resumed_epoch_reports_the_speed_of_the_images_it_trained_itself(synthetic_dataset, tmp_path):
    """images/s in log.jsonl: the images of the epoch's stretch this process ran over the time it took, not the
    whole epoch's images (those before the stop were counted, but not timed, here)."""
    out = tmp_path / "run"
    code, _ = finish(start(train_command(synthetic_dataset, out, resume=False), kill_at_save=6))
    assert code == -signal.SIGKILL and batches_done(out / "last.pt") == 5  # 40 of epoch 1's 48 images trained
    code, err = finish(start(train_command(synthetic_dataset, out, resume=True)))
    assert code == 0, err
    first, second = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert first["images"] == second["images"] == 48
    for record, trained in ((first, 8), (second, 48)):  # epoch 1: its last batch, here; epoch 2: all of it
        rounding = 0.005 * record["images_per_second"] + 0.005 * record["train_seconds"] + 0.01  # 2 decimals each
        assert abs(record["images_per_second"] * record["train_seconds"] - trained) <= rounding, record
