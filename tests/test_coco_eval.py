"""The coco-caption metrics: computed on the project's normalised words; METEOR never crashes or hangs."""

import os
import stat

import pytest

pytest.importorskip("pycocoevalcap", reason="pip install captioner[coco-eval]")

from captioner import coco_eval  # noqa: E402
from captioner.scoring import score_captions  # noqa: E402

REFS = {1: ["A red circle, on the left.", "one red circle at the left"], 2: ["two blue squares in the middle"]}
HYPS = {1: "a red circle on the left", 2: "blue squares"}


def test_cider_and_rouge_match_pycocoevalcap_on_the_same_tokens():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, per_image, skipped = score_captions(REFS, HYPS, "all")
    gts = {1: ["a red circle on the left", "one red circle at the left"], 2: ["two blue squares in the middle"]}
    res = {1: ["a red circle on the left"], 2: ["blue squares"]}
    assert corpus["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert corpus["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert per_image[1]["ROUGE_L"] == pytest.approx(1.0)
    assert "SPICE" in skipped


def test_without_java_meteor_is_skipped_and_tokenisation_falls_back_with_reasons(monkeypatch):
    monkeypatch.setattr(coco_eval.shutil, "which", lambda name: None)
    corpus, _, skipped = score_captions(REFS, HYPS, "all")
    assert "METEOR" not in corpus and "no Java" in skipped["METEOR"]
    assert "CIDEr" in corpus and "Bleu_4" in corpus
    assert corpus["tokenization"].startswith("normalised (PTB tokenizer unavailable: no Java")


@pytest.mark.parametrize("script", ["#!/bin/sh\necho 'Error: could not reserve heap' >&2\nexit 1\n",
                                    "#!/bin/sh\nsleep 60\n"])
def test_a_broken_or_stuck_java_skips_meteor_instead_of_crashing_or_hanging(tmp_path, monkeypatch, script):
    fake = tmp_path / "java"
    fake.write_text(script)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gts = {i: [" ".join(r.lower().replace(",", "").replace(".", "").split()) for r in refs] for i, refs in REFS.items()}
    res = {i: [h] for i, h in HYPS.items()}
    corpus, _, skipped = coco_eval.coco_caption_metrics(gts, res, meteor_timeout=3)
    assert "METEOR" not in corpus and skipped["METEOR"].startswith("METEOR skipped: METEOR failed")
    assert "CIDEr" in corpus


@pytest.mark.skipif(coco_eval.shutil.which("java") is None, reason="METEOR needs a Java runtime")
def test_meteor_equals_pycocoevalcap_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {1: ["a red circle on the left", "one red circle at the left"], 2: ["two blue squares in the middle"]}
    res = {1: ["a red circle on the left"], 2: ["blue squares"]}
    corpus, per_image = coco_eval._meteor(gts, res, timeout=120)
    reference = Meteor()
    expected, expected_per_image = reference.compute_score(gts, res)
    assert corpus == pytest.approx(expected, abs=1e-9)
    assert per_image == pytest.approx(expected_per_image, abs=1e-9)


def test_all_metrics_without_pycocoevalcap_is_a_clear_error(monkeypatch):
    import builtins

    from captioner.errors import CaptionerError

    real_import = builtins.__import__

    def no_pycocoevalcap(name, *args, **kwargs):
        if name.startswith("pycocoevalcap"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pycocoevalcap)
    with pytest.raises(CaptionerError, match=r"captioner\[coco-eval\]"):
        score_captions(REFS, HYPS, "all")
