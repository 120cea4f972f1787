"""Self-critical sequence training: the reward, the advantages, the sampled batches, the loss they train, and
the --scst-epochs phase of a training run (logged, resumable, added to a finished run)."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from captioner.cli import main
from captioner.data.collate import Batch
from captioner.engine import EpochTotals, caption_loss_of, prepare_images, train_one_epoch
from captioner.metrics import bleu_from_words
from captioner.data.collate import teacher_forcing_tensors
from captioner.scst import SelfCriticalBatches, leave_one_out_advantages, sentence_reward, then_constant
from captioner.text import BOS_ID, EOS_ID, PAD_ID
from conftest import TINY, tiny_model

REFS = [["a", "red", "circle", "on", "the", "left"], ["a", "red", "ball", "at", "the", "left", "side"]]


def test_a_caption_equal_to_a_reference_scores_one_and_one_sharing_no_word_scores_zero():
    assert sentence_reward(REFS[0], REFS) == pytest.approx(1.0)
    assert sentence_reward(["blue", "square"], REFS) == 0.0
    assert sentence_reward([], REFS) == 0.0


def test_the_reward_is_coco_captions_sentence_bleu4_with_orders_two_to_four_smoothed():
    hypothesis = ["a", "red", "square", "on", "the", "right"]  # 4/6 unigrams, 2/5 bigrams, 0 trigrams or 4-grams
    expected = math.exp((math.log(4 / 6) + math.log(3 / 6) + math.log(1 / 5) + math.log(1 / 4)) / 4)
    assert sentence_reward(hypothesis, REFS) == pytest.approx(expected)
    # The evaluation's own BLEU-4 of this caption is ~0 (no 4-gram match), so every such caption would tie
    assert bleu_from_words({0: REFS}, {0: hypothesis})[0]["Bleu_4"] < 1e-3
    # Shorter than the closest reference: the brevity penalty applies, as in the evaluation
    short = ["a", "red", "circle"]
    unpenalised = math.exp((0 + math.log(3 / 3) + math.log(2 / 2) + math.log(1 / 1)) / 4)
    assert sentence_reward(short, REFS) == pytest.approx(unpenalised * math.exp(1 - 6 / 3))


def test_each_sample_is_judged_against_the_mean_of_its_images_other_samples():
    rewards = torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.5, 0.5]])
    advantages = leave_one_out_advantages(rewards)
    assert torch.allclose(advantages[0], torch.tensor([0.2 - 0.5, 0.4 - 0.4, 0.6 - 0.3]), atol=1e-6)
    assert torch.equal(advantages[1], torch.zeros(3))  # all alike: nothing to learn
    assert torch.allclose(advantages.sum(dim=1), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(torch.ones(4, 1))


def test_a_caption_cut_off_at_the_length_limit_gets_no_eos_target():
    tokens_in, targets = teacher_forcing_tensors([[5, 6], [7, 8, 9]], ended=[True, False])
    assert tokens_in.tolist() == [[BOS_ID, 5, 6, PAD_ID], [BOS_ID, 7, 8, 9]]
    assert targets.tolist() == [[5, 6, EOS_ID, PAD_ID], [7, 8, 9, PAD_ID]]


def test_weighted_caption_loss_is_the_policy_gradient_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10)
    targets = torch.tensor([[4, 5, EOS_ID, PAD_ID], [6, EOS_ID, PAD_ID, PAD_ID], [7, 8, 9, EOS_ID]])
    weights = torch.tensor([0.5, -1.0, 0.25])
    batch = Batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), targets, targets, torch.zeros(3, dtype=torch.long),
                  [["x"]], [0], ["x.jpg"], [0], 0, row_weights=weights)
    log_probs = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]  # (3, 4)
    real = targets != PAD_ID
    expected = -(weights[:, None] * log_probs * real).sum() / real.sum()
    assert caption_loss_of(logits, batch, label_smoothing=0.1) == pytest.approx(float(expected), rel=1e-5)
    rows = real.flatten().nonzero().squeeze(1)  # the same loss from the real positions' logits alone
    assert caption_loss_of(logits.flatten(0, 1)[rows], batch, 0.1, rows) == pytest.approx(float(expected), rel=1e-5)
    # Unweighted captions keep the label-smoothed mean cross-entropy
    human = Batch(batch.images, targets, targets, batch.caption_image_index, [["x"]], [0], ["x.jpg"], [0], 0)
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, label_smoothing=0.1)
    assert caption_loss_of(logits, human, label_smoothing=0.1) == pytest.approx(float(plain))
    assert caption_loss_of(logits.flatten(0, 1)[rows], human, 0.1, rows) == pytest.approx(float(plain))


class _Tokens:
    """A tokenizer stand-in: token id n is the word "wn"."""

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def _batch(images: int = 3) -> Batch:
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (images, 3, 64, 64), dtype=torch.uint8)
    tokens = torch.full((images, 2), BOS_ID, dtype=torch.long)
    return Batch(pixels, tokens, tokens, torch.arange(images), [["w5 w6 w7", "w5 w8"]] * images,
                 list(range(images)), [f"{i}.jpg" for i in range(images)], list(range(10, 10 + images)), 0)


def test_self_critical_batches_hold_k_weighted_samples_per_image_drawn_reproducibly():
    model = tiny_model(vocab_size=12, max_len=8).train()
    totals = EpochTotals()
    batches = SelfCriticalBatches([_batch()], model, _Tokens(), torch.device("cpu"), samples=4, max_len=8, seed=0,
                                  epoch=3, totals=totals)
    sampled = next(iter(batches))
    assert model.training, "sampling runs in eval mode and must hand the model back in training mode"
    assert sampled.tokens_in.shape[0] == 12 and sampled.caption_image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert sampled.tokens_in.shape[1] <= 8  # bos + tokens fit the decoder's positions
    assert torch.allclose(sampled.row_weights.view(3, 4).sum(dim=1), torch.zeros(3), atol=1e-6)
    assert totals.rewards == 12 and 0.0 <= totals.reward_sum <= 12.0
    again = next(iter(SelfCriticalBatches([_batch()], model, _Tokens(), torch.device("cpu"), 4, 8, 0, 3,
                                          EpochTotals())))
    assert torch.equal(again.tokens_in, sampled.tokens_in)  # same run seed, epoch and images: same samples
    other_epoch = next(iter(SelfCriticalBatches([_batch()], model, _Tokens(), torch.device("cpu"), 4, 8, 0, 4,
                                                EpochTotals())))
    assert not torch.equal(other_epoch.tokens_in, sampled.tokens_in)


def test_a_self_critical_step_moves_probability_towards_the_samples_that_scored_above_their_siblings():
    model = tiny_model(vocab_size=12, max_len=8, bow_weight=0.0).train()
    batch = next(iter(SelfCriticalBatches([_batch()], model, _Tokens(), torch.device("cpu"), 4, 8, 0, 1,
                                          EpochTotals())))
    best, worst = int(batch.row_weights.argmax()), int(batch.row_weights.argmin())
    assert batch.row_weights[best] > 0 > batch.row_weights[worst]

    def sequence_log_prob(row: int) -> float:
        # In training mode, as the step sees it (no dropout in the tiny model; BatchNorm on this batch's statistics)
        with torch.no_grad():
            logits = model(prepare_images(batch.images, torch.device("cpu")), batch.tokens_in,
                           batch.caption_image_index)
        real = batch.targets[row] != PAD_ID
        log_probs = logits[row].log_softmax(-1).gather(1, batch.targets[row].clamp(min=0)[:, None])[:, 0]
        return float(log_probs[real].sum())

    before = sequence_log_prob(best), sequence_log_prob(worst)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(model, [batch], optimizer, scheduler, torch.device("cpu"), 1, label_smoothing=0.1, clip_grad=0.0,
                    progress=False)
    after = sequence_log_prob(best), sequence_log_prob(worst)
    assert after[0] > before[0] and after[1] < before[1]


def test_the_schedule_turns_constant_once_the_cross_entropy_updates_are_done():
    factor = then_constant(lambda step: 1.0 - step / 10, 10, 0.05)
    assert [factor(s) for s in (0, 5, 9, 10, 25)] == [1.0, 0.5, pytest.approx(0.1), 0.05, 0.05]


def _train(dataset, out, *flags):
    d = dataset
    return main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(out), *TINY, *flags])


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_scst_epochs_follow_the_cross_entropy_epochs_and_log_their_mean_reward(synthetic_dataset, tmp_path):
    assert _train(synthetic_dataset, tmp_path / "run", "--epochs", "1", "--scst-epochs", "2", "--lr", "3e-3") == 0
    log = _log(tmp_path / "run")
    assert [(r["epoch"], r["phase"]) for r in log] == [(1, "cross_entropy"), (2, "scst"), (3, "scst")]
    assert "scst_reward" not in log[0]
    assert all(0.0 < r["scst_reward"] < 1.0 for r in log[1:])
    assert log[1]["lr"] == pytest.approx(5e-5)  # --scst-lr's default, constant


def test_a_finished_run_resumed_with_scst_epochs_goes_on_with_them(synthetic_dataset, tmp_path):
    out = tmp_path / "run"
    assert _train(synthetic_dataset, out, "--epochs", "1") == 0
    assert _train(synthetic_dataset, out, "--epochs", "1", "--scst-epochs", "1", "--scst-lr", "1e-4",
                  "--resume", str(out / "last.pt")) == 0
    log = _log(out)
    assert [(r["epoch"], r["phase"]) for r in log] == [(1, "cross_entropy"), (2, "scst")]
    assert log[1]["lr"] == pytest.approx(1e-4)


def test_too_few_samples_is_refused_naming_the_flag(synthetic_dataset, tmp_path, capsys):
    assert _train(synthetic_dataset, tmp_path / "run", "--epochs", "1", "--scst-epochs", "1",
                  "--scst-samples", "1") != 0
    assert "--scst-samples (train.scst_samples) must be at least 2, got 1" in capsys.readouterr().err


def test_a_run_killed_inside_a_self_critical_epoch_resumes_to_the_same_weights(synthetic_dataset, tmp_path):
    from test_resume import assert_same_weights, batches_done, finish, start, weights

    def command(out, every: int, resume: bool = False):
        d = synthetic_dataset
        args = ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                "--out", str(out), *TINY, "--batch-size", "8", "--epochs", "1", "--scst-epochs", "1",
                "--scst-lr", "1e-3", "--checkpoint-every", str(every), "--deterministic", "--dropout", "0.1"]
        return args + (["--resume", str(out / "last.pt")] if resume else [])

    reference = tmp_path / "reference"
    code, err = finish(start(command(reference, every=0)))
    assert code == 0, err
    out = tmp_path / "interrupted"
    # Saves: batches 1-5 of epoch 1, best.pt and last.pt at its end, then batch 1 of epoch 2; killed at the 9th
    code, _ = finish(start(command(out, every=1), kill_at_save=9))
    assert code == -signal.SIGKILL
    assert batches_done(out / "last.pt") == 7  # one batch into the self-critical epoch
    code, err = finish(start(command(out, every=1, resume=True)))
    assert code == 0, err
    assert_same_weights(weights(out / "last.pt"), weights(reference / "last.pt"))
    log, reference_log = _log(out), _log(reference)
    assert reference_log[1]["train_loss"] != 0.0, "the samples' advantages were all zero: nothing was reinforced"
    for key in ("phase", "scst_reward", "train_loss", "val_Bleu_4"):
        assert [r.get(key) for r in log] == [r.get(key) for r in reference_log], key


def test_the_cider_reward_scores_each_sample_with_the_training_captions_frequencies():
    from captioner.cider import CiderD
    from captioner.scst import make_reward
    from captioner.text import caption_words

    training = [["A red circle on the left.", "a red ball"], ["a blue square", "A blue box at the top."]]
    reward = make_reward("cider", training)
    references = [caption_words(c) for c in training[0]]
    samples = [caption_words("a red circle on the left"), caption_words("a blue box")]
    expected = CiderD([[caption_words(c) for c in captions] for captions in training])
    assert reward(samples, references) == pytest.approx([expected.score(s, references) for s in samples])
    assert reward(samples, references)[0] > reward(samples, references)[1]
    assert make_reward("bleu")(samples, references) == [sentence_reward(s, references) for s in samples]
    with pytest.raises(ValueError, match="unknown self-critical reward"):
        make_reward("rouge")


def test_scst_with_the_cider_reward_trains_and_logs_it(synthetic_dataset, tmp_path):
    assert _train(synthetic_dataset, tmp_path / "run", "--epochs", "1", "--scst-epochs", "1", "--lr", "3e-3",
                  "--scst-reward", "cider") == 0
    log = _log(tmp_path / "run")
    assert [r["phase"] for r in log] == ["cross_entropy", "scst"] and log[1]["scst_reward"] >= 0.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["scst_reward"] == "cider"


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_self_critical_training_starts_from_the_best_epochs_weights(tmp_path):
    """--scst-start best (the default) loads the best epoch's checkpoint into the model (and its moving average)
    and keeps it as RUN/scst_start.pt: a run killed after its first self-critical epoch replaced best.pt, but
    before last.pt followed, starts the phase again from there. When the last epoch is the best one nothing is
    loaded; when no checkpoint holds the best epoch, the run stops and says so."""
    from captioner.checkpoint import save_checkpoint
    from captioner.config import RunConfig
    from captioner.distributed import Distributed
    from captioner.ema import ModelEMA
    from captioner.errors import CaptionerError
    from captioner.run_files import SCST_START, restore_best_weights

    torch.manual_seed(0)
    best_model, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = ModelEMA(model, 0.9)
    saved_average = {k: v + 1.0 for k, v in best_model.state_dict().items()}
    history = [{"epoch": 1, "val_Bleu_4": 0.1}, {"epoch": 2, "val_Bleu_4": 0.3}, {"epoch": 3, "val_Bleu_4": 0.2}]
    save_checkpoint(tmp_path / "best.pt", {"model": saved_average, "raw_model": best_model.state_dict(),
                                           "ema_updates": 7, "config": RunConfig().to_dict(), "epoch": 2,
                                           "metrics": {"Bleu_4": 0.3}})
    last_weights = _state(model)
    resumed_into = tmp_path / "new_out"  # a resume into another --out: best.pt is beside the resumed checkpoint
    resumed_into.mkdir()

    restore_best_weights(model, ema, history[:2], tmp_path, [], Distributed())  # the last epoch is the best
    assert all(torch.equal(v, last_weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(CaptionerError, match="no checkpoint holds them .no best.pt in .*new_out.*--scst-start last"):
        restore_best_weights(model, ema, history, resumed_into, [], Distributed())
    with pytest.raises(CaptionerError, match=r"best.pt holds epoch 2\); use --scst-start last to start from epoch"):
        restore_best_weights(model, ema, [{**history[0], "val_Bleu_4": 0.5}, *history[1:]], tmp_path, [],
                             Distributed())

    restore_best_weights(model, ema, history, resumed_into, [tmp_path], Distributed())
    assert all(torch.equal(v, best_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved_average[k]) for k, v in ema.state_dict().items())
    assert ema.updates == 7
    kept = (resumed_into / SCST_START).read_bytes()
    assert kept == (tmp_path / "best.pt").read_bytes()

    # The first self-critical epoch improved on epoch 2 and replaced best.pt; the run died before last.pt
    save_checkpoint(tmp_path / "best.pt", {"model": {k: v * 0 for k, v in saved_average.items()},
                                           "config": RunConfig().to_dict(), "epoch": 4, "metrics": {"Bleu_4": 0.4}})
    model.load_state_dict(last_weights)
    restore_best_weights(model, ema, history, resumed_into, [tmp_path], Distributed())
    assert all(torch.equal(v, best_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert (resumed_into / SCST_START).read_bytes() == kept


def test_early_stopping_ends_the_cross_entropy_epochs_and_the_self_critical_ones_follow(synthetic_dataset,
                                                                                       tmp_path, caplog):
    """lr ~0 and no dropout: validation BLEU-4 never improves on epoch 1, so patience 2 ends the cross-entropy
    phase after epoch 3 of 6; a resume of the stopped run trains nothing more, and one given --scst-epochs goes
    on with those, from epoch 1's weights at --scst-lr."""
    import logging

    out = tmp_path / "run"
    flags = ["--lr", "1e-9", "--trainable-layers", "0", "--dropout", "0", "--val-limit", "2"]
    assert _train(synthetic_dataset, out, "--epochs", "6", *flags, "--early-stop-patience", "2") == 0
    assert [(r["epoch"], r.get("early_stopped", False)) for r in _log(out)] == [(1, False), (2, False), (3, True)]
    stopped = (out / "last.pt").read_bytes()

    assert main(["train", "--resume", str(out / "last.pt"), "--device", "cpu", "--no-progress"]) == 0
    assert (out / "last.pt").read_bytes() == stopped and len(_log(out)) == 3

    caplog.set_level(logging.INFO, logger="captioner")
    assert main(["train", "--resume", str(out / "last.pt"), "--device", "cpu", "--no-progress", "--scst-epochs", "1",
                 "--scst-lr", "1e-3"]) == 0
    log = _log(out)
    assert [(r["epoch"], r["phase"]) for r in log] == [(1, "cross_entropy"), (2, "cross_entropy"),
                                                       (3, "cross_entropy"), (4, "scst")]
    assert log[3]["lr"] == pytest.approx(1e-3)
    assert "self-critical training starts from epoch 1's weights" in caplog.text

    one_run = tmp_path / "one_run"  # the same in one command: the self-critical epoch follows the early stop
    assert _train(synthetic_dataset, one_run, "--epochs", "6", *flags, "--early-stop-patience", "2",
                  "--scst-epochs", "1", "--scst-lr", "1e-3") == 0
    log = _log(one_run)
    assert [(r["epoch"], r["phase"], r.get("early_stopped", False)) for r in log] == [
        (1, "cross_entropy", False), (2, "cross_entropy", False), (3, "cross_entropy", True), (4, "scst", False)]
    assert log[3]["lr"] == pytest.approx(1e-3)
