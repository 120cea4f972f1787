"""Two CPU processes under torchrun (gloo) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint, load_model
from conftest import TINY


def train_args(dataset, out: Path, batch_size: int) -> list[str]:
    d = dataset
    # A frozen trunk without grid convolutions and no dropout: nothing then depends on how a global batch is split
    # between processes (BatchNorm in trained stages or grid convolutions sees per-process batches; dropout draws
    # per-process random numbers).
    return ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
            str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
            "--out", str(out), "--epochs", "2", *TINY, "--batch-size", str(batch_size), "--trainable-layers", "0",
            "--grid-convs", "0",
            "--dropout", "0", "--lr", "3e-3", "--ema-decay", "0.9"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(synthetic_dataset, tmp_path):
    single = run([sys.executable, "-m", "captioner.cli", *train_args(synthetic_dataset, tmp_path / "one", 16)])
    assert single.returncode == 0, single.stderr
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "captioner.cli", *train_args(synthetic_dataset, tmp_path / "two", 8)])
    assert double.returncode == 0, double.stderr[-3000:]

    # Rank 0 alone wrote the run folder: one log line per epoch, one result line on stdout.
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two] == [1, 2]
    assert double.stdout.count("best_val_Bleu_4") == 1
    # Validation was decoded across both processes and gathered: every image scored once.
    assert all(r["val_num_images"] == 8 for r in two)
    for a, b in zip(one, two):
        assert b["images"] == a["images"] == 48  # summed over the processes, each of which saw half
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * a["train_loss"]
        for n in (1, 4):
            assert abs(a[f"val_Bleu_{n}"] - b[f"val_Bleu_{n}"]) <= 0.02

    # The same checkpoint format as a single process, and nearly the same weights (the same updates, summed
    # in a different order), trained and averaged (--ema-decay) alike.
    for key in ("raw_model", "model"):
        expected, got = (load_checkpoint(tmp_path / run / "last.pt")[key] for run in ("one", "two"))
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.allclose(expected[name].float(), got[name].float(), atol=2e-4, rtol=1e-3), (key, name)
    model, tokenizer, cfg = load_model(tmp_path / "two" / "best.pt")
    assert cfg.model.vocab_size == tokenizer.vocab_size


def test_torchrun_self_critical_epochs_train_on_every_process_and_report_their_summed_rewards(synthetic_dataset,
                                                                                             tmp_path):
    """Each process samples and scores captions for its share of every batch; the epoch's figures are the run's.
    With lr ~0 validation BLEU-4 never improves on epoch 1, so patience 1 ends the cross-entropy epochs after
    epoch 2 and the self-critical one starts from epoch 1's weights, which rank 0 reads and sends to rank 1.
    Each process augments its images on its device (--augment-on device), as torchrun runs on GPUs do."""
    args = [*train_args(synthetic_dataset, tmp_path / "two", 8), "--epochs", "3", "--lr", "1e-9",
            "--early-stop-patience", "1", "--scst-epochs", "1", "--scst-lr", "3e-3", "--augment", "--hflip",
            "--augment-on", "device"]
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "captioner.cli", *args])
    assert double.returncode == 0, double.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in log] == [(1, "cross_entropy"), (2, "cross_entropy"), (3, "scst")]
    assert "self-critical training starts from epoch 1's weights" in double.stderr
    assert log[2]["images"] == 48 and 0.0 < log[2]["scst_reward"] < 1.0
    assert log[2]["val_num_images"] == 8


def test_torchrun_copies_a_trunk_from_the_pretrained_trunk_cache(synthetic_dataset, tmp_path):
    """Under torchrun a run does not pre-train, but takes a trunk another run stored in --trunk-pretrain-cache:
    rank 0 copies it into the run folder and every process starts from it."""
    cache = tmp_path / "trunks"
    pretrain = [("pretrain-trunk" if a == "train" else a) for a in train_args(synthetic_dataset, tmp_path / "pre", 8)]
    flags = ["--trunk-pretrain-epochs", "1", "--trunk-pretrain-cache", str(cache)]
    single = run([sys.executable, "-m", "captioner.cli", *pretrain, *flags])
    assert single.returncode == 0, single.stderr[-3000:]
    args = [*train_args(synthetic_dataset, tmp_path / "two", 8), "--epochs", "1", *flags]
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "captioner.cli", *args])
    assert double.returncode == 0, double.stderr[-3000:]
    assert "copied the pre-trained trunk" in double.stderr
    stored = (tmp_path / "pre" / "trunk_pretrained.pt").read_bytes()
    assert (tmp_path / "two" / "trunk_pretrained.pt").read_bytes() == stored


def test_torchrun_killed_mid_epoch_resumes_with_the_whole_runs_figures(synthetic_dataset, tmp_path):
    """A mid-epoch checkpoint of a torchrun run holds the epoch's sums over every process (rank 0 writes it), so
    the resumed epoch logs the loss an uninterrupted run logs, not rank 0's share counted once per process."""
    from test_resume import DIE_DURING_SAVE, batches_done

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = train_args(synthetic_dataset, tmp_path / "whole", 4) + ["--checkpoint-every", "1"]
    whole = run([*torchrun, "-m", "captioner.cli", *args])
    assert whole.returncode == 0, whole.stderr[-3000:]

    # Rank 0 (the only writer) tears its 4th checkpoint and dies, during epoch 1; torchrun ends rank 1.
    dying = tmp_path / "dying.py"
    dying.write_text('import os\nif os.environ["RANK"] != "0":\n    os.environ["KILL_AT_SAVE"] = "1000000"\n'
                     + DIE_DURING_SAVE)
    out = tmp_path / "killed"
    args = train_args(synthetic_dataset, out, 4) + ["--checkpoint-every", "1"]
    killed = subprocess.run([*torchrun, str(dying), *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                 "OMP_NUM_THREADS": "1", "KILL_AT_SAVE": "4"})
    assert killed.returncode != 0 and batches_done(out / "last.pt") == 3, killed.stderr[-3000:]
    resumed = run([*torchrun, "-m", "captioner.cli", "train", "--resume", str(out / "last.pt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = ([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                     for name in ("whole", "killed"))
    assert [r["epoch"] for r in got] == [1, 2]
    for a, b in zip(expected, got):
        assert b["images"] == a["images"] == 48 and b["steps"] == a["steps"] == 6
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * a["train_loss"], (a["train_loss"], b["train_loss"])


class _TwoProcessVote:
    """The vote of this process and another one whose answers are scripted: (signal there, checkpoint due there)."""

    enabled = True

    def __init__(self, others: list[tuple[bool, bool]]) -> None:
        self.others = others

    def any_each(self, flags: list[bool], device: torch.device) -> list[bool]:
        return [mine or theirs for mine, theirs in zip(flags, self.others.pop(0))]


def test_processes_stop_on_the_vote_not_on_a_signal_that_came_after_it():
    import signal

    from captioner.stop_signals import StopSignals

    stop, device = StopSignals(), torch.device("cpu")
    dist = _TwoProcessVote(others=[(False, False), (False, False)])
    assert stop.agreed(dist, device) == (False, False)
    stop.received = signal.SIGINT  # arrives after that vote: the other process goes on to its next batch, so must this
    assert stop.agreed(dist, device) == (True, False) and stop.received == signal.SIGINT  # counted at the next vote

    told = StopSignals()  # this process got nothing, the other a signal: both stop, this one as for a SIGTERM
    assert told.agreed(_TwoProcessVote(others=[(True, False)]), device) == (True, False)
    assert told.received == signal.SIGTERM


def test_a_checkpoint_due_on_one_process_clock_is_written_by_all():
    """--checkpoint-minutes reads each process's clock; writing a checkpoint sums figures over all processes, so
    a process whose clock says "not yet" must join the one whose clock says "now", or that one waits forever."""
    from captioner.stop_signals import StopSignals

    device = torch.device("cpu")
    assert StopSignals().agreed(_TwoProcessVote(others=[(False, True)]), device, checkpoint_due=False) == (False, True)
    assert StopSignals().agreed(_TwoProcessVote(others=[(False, False)]), device, checkpoint_due=True) == (False, True)
    assert StopSignals().agreed(_TwoProcessVote(others=[(False, False)]), device) == (False, False)
