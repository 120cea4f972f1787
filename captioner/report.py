"""Error analysis: per-image scores as JSON lines, and an HTML page of the best and worst captioned images.

The page is self-contained (thumbnails are embedded as small JPEGs), so it can be mailed or archived with a
benchmark run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image

from .data.images import load_image
from .engine import Evaluation
from .errors import ImageReadError

THUMBNAIL_SIZE = 192


def ranking_metric(evaluation: Evaluation) -> str:
    """CIDEr-D when it was computed (the field's headline metric), else BLEU-4."""
    return "CIDEr" if any("CIDEr" in s for s in evaluation.per_image.values()) else "Bleu_4"


def per_image_records(evaluation: Evaluation) -> list[dict]:
    """One record per image, worst first by the ranking metric."""
    key = ranking_metric(evaluation)
    rows = [{"image_id": image_id, "path": evaluation.paths.get(image_id, ""), "caption": caption,
             "references": evaluation.references[image_id],
             "scores": {k: round(v, 6) for k, v in evaluation.per_image[image_id].items()}}
            for image_id, caption in evaluation.captions.items()]
    return sorted(rows, key=lambda r: r["scores"][key])


def write_coco_results(path: str | Path, captions: dict) -> None:
    """The official COCO results file: [{"image_id": int, "caption": str}, ...]."""
    Path(path).write_text(json.dumps([{"image_id": i, "caption": text} for i, text in captions.items()]) + "\n")


def write_per_image_scores(path: str | Path, evaluation: Evaluation) -> None:
    with open(path, "w") as f:
        for row in per_image_records(evaluation):
            f.write(json.dumps(row) + "\n")


def _thumbnail(path: str) -> str:
    """A data: URL of the image shrunk to THUMBNAIL_SIZE, or '' when it cannot be read any more."""
    try:
        image = load_image(path)
    except ImageReadError:
        return ""
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _rows_html(rows: list[dict]) -> str:
    out = []
    for row in rows:
        src = _thumbnail(row["path"])
        image = f'<img src="{src}" alt="">' if src else "(image unreadable)"
        scores = ", ".join(f"{k} {v:.3f}" for k, v in row["scores"].items())
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
        out.append(f"<tr><td>{image}</td><td><b>{html.escape(row['caption'])}</b><br><small>{scores}<br>"
                   f"{html.escape(str(row['path']))}</small><ol>{refs}</ol></td></tr>")
    return "\n".join(out)


def write_error_report(path: str | Path, evaluation: Evaluation, count: int = 12, title: str = "captioner") -> None:
    """HTML with the `count` best and `count` worst captioned images, their captions, scores and references."""
    rows = per_image_records(evaluation)
    key = ranking_metric(evaluation)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items() if isinstance(v, float))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}: error analysis</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{vertical-align:top;padding:6px}} img{{max-width:{THUMBNAIL_SIZE}px}}
ol{{margin:4px 0;color:#444}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{len(rows)} images; {html.escape(summary)}. Ranked by per-image {key}.</p>
<h2>Worst {min(count, len(rows))}</h2><table>{_rows_html(rows[:count])}</table>
<h2>Best {min(count, len(rows))}</h2><table>{_rows_html(rows[::-1][:count])}</table>
</body></html>
"""
    Path(path).write_text(page)
