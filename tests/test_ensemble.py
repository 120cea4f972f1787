"""Ensembles: several checkpoints decoding as one model, averaging their next-token probabilities."""

import csv
import json

import pytest
import torch

from captioner.checkpoint import load_model, save_checkpoint, tokenizer_payload
from captioner.cli import main
from captioner.config import DataConfig, RunConfig
from captioner.decoding import BOS_ID, decode
from captioner.ensemble import Ensemble, load_models
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.text import Tokenizer
from conftest import tiny_model_config

CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a green triangle below a red circle"] * 5


def _save(path, captions=CAPTIONS, image_size=64, seed=0, **model):
    tokenizer = Tokenizer.train(captions)
    cfg = RunConfig(model=tiny_model_config(vocab_size=tokenizer.vocab_size, **model),
                    data=DataConfig(image_size=image_size))
    torch.manual_seed(seed)
    save_checkpoint(path, {"model": Captioner(cfg.model).state_dict(), "config": cfg.to_dict(),
                           "tokenizer": tokenizer_payload(tokenizer)})
    return path


def _captions(model, images, **options):
    with torch.inference_mode():
        return [[(h.tokens, h.score) for h in per_image] for per_image in decode(model, model.encode(images),
                                                                                   **options)]


@pytest.mark.parametrize("options", [dict(beam_size=1), dict(beam_size=3, num_return=2),
                                     dict(beam_size=2, length_penalty=1.0, no_repeat_ngram=2)])
def test_an_ensemble_of_copies_captions_as_its_model_does(trained_run, synthetic_dataset, options):
    """Averaging a distribution with itself changes nothing: same captions, same scores, beam search included."""
    from captioner.data.factory import evaluation_loader, load_records
    from captioner.engine import prepare_images

    records = load_records("coco", "val", captions=synthetic_dataset.val_captions,
                           images=synthetic_dataset.val_images)
    batch = next(iter(evaluation_loader(records, 64, 8)))
    images = prepare_images(batch.images, torch.device("cpu"))
    model, _, _ = load_model(trained_run / "best.pt")
    ensemble, _, _ = load_models([trained_run / "best.pt", trained_run / "best.pt"])
    single, together = _captions(model, images, **options), _captions(ensemble, images, **options)
    assert [[tokens for tokens, _ in image] for image in together] == [[tokens for tokens, _ in image]
                                                                       for image in single]
    assert [score for image in together for _, score in image] == pytest.approx(
        [score for image in single for _, score in image], abs=1e-4)
    assert any(len(image[0][0]) > 1 for image in single)  # real captions, not an immediate end


def test_members_of_different_architectures_average_their_probabilities(tmp_path):
    """A Transformer and a wider LSTM over other grids: every step's distribution is the mean of the two."""
    transformer = load_model(_save(tmp_path / "t.pt"))[0]
    lstm = load_model(_save(tmp_path / "l.pt", seed=1, decoder="lstm", dim=48, bridge="pool", max_len=6))[0]
    ensemble = Ensemble([transformer, lstm], image_size=64).eval()
    assert ensemble.max_caption_len == 6  # the shorter limit: no member is asked past its own
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        memory = ensemble.encode(images)  # (B, F)
        assert memory.shape[0] == 2 and ensemble.memory_shapes[1][1] == 48
        state = ensemble.init_state(memory)
        states = [m.init_state(m.encode(images)) for m in (transformer, lstm)]
        tokens = torch.full((2,), BOS_ID)
        for _ in range(3):
            log_probs, state = ensemble.step(tokens, state)  # (B, V)
            member_probs = []
            for i, member in enumerate((transformer, lstm)):
                member_log_probs, states[i] = member.step(tokens, states[i])
                member_probs.append(member_log_probs.exp())
            assert log_probs.exp() == pytest.approx(((member_probs[0] + member_probs[1]) / 2), abs=1e-6)
            tokens = log_probs.argmax(dim=-1)
        hypotheses = decode(ensemble, memory, beam_size=3, max_len=30)
        sampled = [decode(ensemble, memory, sample=True, num_return=3, seed=5) for _ in range(2)]
    assert len(hypotheses) == 2 and all(len(image[0].tokens) <= 6 for image in hypotheses)
    assert [[h.tokens for h in image] for image in sampled[0]] == [[h.tokens for h in image] for image in sampled[1]]


def test_members_that_cannot_decode_together_are_refused_by_name(tmp_path):
    first = _save(tmp_path / "first.pt")
    other_words = _save(tmp_path / "other_words.pt", captions=[c.replace("red", "crimson") for c in CAPTIONS])
    other_size = _save(tmp_path / "other_size.pt", image_size=96)
    with pytest.raises(CaptionerError, match="other_words.pt has another vocabulary"):
        load_models([first, other_words])
    with pytest.raises(CaptionerError, match="other_size.pt reads 96 px images"):
        load_models([first, other_size])
    model, _, _ = load_models([first])
    assert isinstance(model, Captioner)  # one checkpoint is just that model


def test_evaluate_and_caption_take_several_checkpoints(trained_run, synthetic_dataset, tmp_path, capsys):
    best, last = str(trained_run / "best.pt"), str(trained_run / "last.pt")
    data = ["--dataset", "coco", "--captions", str(synthetic_dataset.val_captions), "--images",
            str(synthetic_dataset.val_images), "--device", "cpu", "--beam-size", "2"]

    def evaluate(*checkpoints):
        flags = [flag for checkpoint in checkpoints for flag in ("--checkpoint", checkpoint)]
        assert main(["evaluate", *flags, *data]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    alone, twice, pair = evaluate(best), evaluate(best, best), evaluate(best, last)
    assert twice["Bleu_4"] == pytest.approx(alone["Bleu_4"]) and twice["ensemble"] == [best, best]
    assert pair["checkpoint"] == f"{best}+{last}" and pair["num_images"] == alone["num_images"] == 8
    assert alone["checkpoint"] == best and "ensemble" not in alone

    images = str(synthetic_dataset.val_images)
    assert main(["caption", "--checkpoint", best, "--checkpoint", last, images, "--device", "cpu", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 8 and all(entry["captions"][0]["caption"] for entry in lines)
    assert main(["caption", "--checkpoint", best, "--checkpoint", last, images, "--attention",
                 str(tmp_path / "maps")]) == 2
    assert "one checkpoint" in capsys.readouterr().err and not (tmp_path / "maps").exists()


def test_bleu_bench_scores_an_ensemble_entry(trained_run, synthetic_dataset, tmp_path, capsys):
    best, last = trained_run / "best.pt", trained_run / "last.pt"
    out = tmp_path / "bench"
    assert main(["bleu-bench", "--checkpoints", str(best), f"{best}+{best}", f"{best}+{last}", "--beam-sizes", "2",
                 "--dataset", "coco", "--captions", str(synthetic_dataset.val_captions), "--images",
                 str(synthetic_dataset.val_images), "--out", str(out), "--device", "cpu"]) == 0
    rows = {row["run"]: row for row in csv.DictReader(open(out / "results.csv"))}
    label = f"{trained_run.name}_best"
    assert set(rows) == {f"{label}_beam2_lp0", f"{label}+{label}_beam2_lp0",
                         f"{label}+{trained_run.name}_last_beam2_lp0"}
    assert rows[f"{label}+{label}_beam2_lp0"]["Bleu_4"] == rows[f"{label}_beam2_lp0"]["Bleu_4"]
    record = json.loads((out / "run.json").read_text())
    assert set(record["checkpoints"]) == {str(best), str(last)} and record["entries"][2] == f"{best}+{last}"
    assert main(["bleu-bench", "--checkpoints", f"{best}+{tmp_path / 'nope.pt'}", "--dataset", "coco",
                 "--captions", str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_bleu_bench_entries_split_at_the_plus_signs_between_existing_files(tmp_path):
    from captioner.benchmarks.bleu_bench import ensemble_members

    plus_folder, plain = tmp_path / "a+b" / "best.pt", tmp_path / "c" / "best.pt"
    for path in (plus_folder, plain):
        path.parent.mkdir()
        path.write_bytes(b"")
    assert ensemble_members(str(plus_folder)) == [str(plus_folder)]
    assert ensemble_members(f"{plus_folder}+{plain}") == [str(plus_folder), str(plain)]
    assert ensemble_members(f"{plain}+{plus_folder}") == [str(plain), str(plus_folder)]
    missing = tmp_path / "gone.pt"
    assert ensemble_members(f"{plain}+{missing}") == [str(plain), str(missing)]  # the error names gone.pt
