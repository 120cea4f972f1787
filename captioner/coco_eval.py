"""CIDEr-D, ROUGE-L and METEOR from the coco-caption toolkit (`pip install captioner[coco-eval]`).

`tokenize_like_coco_caption` puts references and hypotheses through coco-caption's own tokenisation (Stanford
PTBTokenizer, lowercased, punctuation tokens dropped), so that every metric, BLEU included, equals what
`COCOEvalCap` reports for the same results file. The tokenizer is Java; without Java, captions fall back to the
project's normalisation (lowercase, punctuation removed), and the output says so.

METEOR is a Java program. Without a `java` on PATH it is skipped with a one-line reason; if the Java process
dies (the "broken pipe" users of other projects hit) or takes longer than `meteor_timeout` seconds it is
stopped and skipped with the reason, never a crash or a hang. SPICE is left out: it downloads Stanford CoreNLP
models on first use, which an offline machine cannot do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from .errors import CaptionerError
from .text import normalize_caption


COCO_METRICS = ("CIDEr", "ROUGE_L", "METEOR")
SPICE_REASON = "SPICE is not computed: it downloads Stanford CoreNLP models on first use (needs a network)"


def _require_pycocoevalcap():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise CaptionerError("--metrics all needs the coco-caption scorers: pip install 'captioner[coco-eval]'") \
            from None


def tokenize_like_coco_caption(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]):
    """-> (gts, res, tokenization): image id -> tokenised reference strings / [tokenised hypothesis], and
    "ptb" or "normalised" (with the reason PTB was not used)."""
    _require_pycocoevalcap()
    ids = list(hypotheses)
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        if shutil.which("java") is None:
            raise RuntimeError("no Java runtime on PATH")
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": r} for r in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": hypotheses[i]}] for i in ids})
        if set(gts) != set(ids) or set(res) != set(ids):
            raise RuntimeError("the PTB tokenizer returned fewer captions than it was given")
        return gts, res, "ptb"
    except (RuntimeError, OSError) as exc:
        gts = {i: [normalize_caption(r) for r in references[i]] for i in ids}
        res = {i: [normalize_caption(hypotheses[i])] for i in ids}
        return gts, res, f"normalised (PTB tokenizer unavailable: {exc})"


def _meteor_jar() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__))) / "meteor" / "meteor-1.5.jar"


def _meteor_exchange(process: subprocess.Popen, gts: dict, res: dict, outcome: dict) -> None:
    """coco-caption's METEOR protocol over stdin/stdout: one SCORE line per image (answered with its
    statistics), then one EVAL line with all of them (answered with one score per image and the corpus score)."""
    try:
        stats = []
        for image_id, hypothesis in res.items():
            hyp = hypothesis[0].replace("|||", "").replace("  ", " ")
            process.stdin.write(f"SCORE ||| {' ||| '.join(gts[image_id])} ||| {hyp}\n".encode())
            process.stdin.flush()
            stats.append(process.stdout.readline().decode().strip())
        process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        process.stdin.flush()
        per_image = [float(process.stdout.readline().strip()) for _ in res]
        outcome["value"] = (float(process.stdout.readline().strip()), per_image)
    except Exception as exc:  # BrokenPipeError when Java died, ValueError on an empty or truncated reply
        outcome["error"] = exc


def _meteor(gts: dict, res: dict, timeout: float) -> tuple[float, list[float]]:
    """METEOR 1.5 (the jar pycocoevalcap ships) in its own process group, driven from a worker thread; any
    failure or a reply slower than `timeout` seconds kills the whole group and raises RuntimeError."""
    jar = _meteor_jar()
    process = subprocess.Popen(["java", "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"],
                               cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    outcome: dict = {}
    worker = threading.Thread(target=_meteor_exchange, args=(process, gts, res, outcome), daemon=True)
    worker.start()
    worker.join(timeout)
    stalled = worker.is_alive()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # java and anything it started; also unblocks the worker
    except ProcessLookupError:
        pass
    worker.join(5)
    if stalled or "error" in outcome:
        try:
            _, stderr = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            stderr = b""
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] if stderr else []
        why = f"no answer within {timeout:g} s" if stalled else repr(outcome["error"])
        raise RuntimeError(f"METEOR failed ({why}){': ' + last[0] if last else ''}")
    process.communicate()
    return outcome["value"]


def coco_caption_metrics(gts: dict, res: dict, meteor_timeout: float = 600.0
                         ) -> tuple[dict[str, float], dict[Hashable, dict[str, float]], dict[str, str]]:
    """Tokenised captions (see tokenize_like_coco_caption) -> (corpus scores, per-image scores, skipped
    metric -> reason) for CIDEr-D, ROUGE-L and METEOR."""
    _require_pycocoevalcap()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(res)
    corpus: dict[str, float] = {}
    per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}
    skipped = {"SPICE": SPICE_REASON}
    for name, scorer in (("CIDEr", Cider()), ("ROUGE_L", Rouge())):
        score, scores = scorer.compute_score(gts, res)
        corpus[name] = float(score)
        for i, s in zip(ids, scores):
            per_image[i][name] = float(s)
    if shutil.which("java") is None:
        skipped["METEOR"] = "METEOR skipped: no Java runtime on PATH (METEOR is a Java program)"
    else:
        try:
            score, scores = _meteor(gts, res, meteor_timeout)
            corpus["METEOR"] = score
            for i, s in zip(ids, scores):
                per_image[i]["METEOR"] = s
        except (RuntimeError, OSError) as exc:
            skipped["METEOR"] = f"METEOR skipped: {exc}"
    return corpus, per_image, skipped  # the callers say why a metric is missing, once (evaluate, bleu-bench)
