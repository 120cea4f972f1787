"""`captioner demo`: synthetic scenes -> train -> evaluate (beam 3) -> caption held-out images, on CPU in minutes.

It runs exactly the library calls a user would: make_synthetic, fit, the evaluation loop and the captioner,
so a green demo means the whole pipeline works on this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import load_model
from .config import RunConfig
from .data.coco import load_coco
from .data.factory import evaluation_loader  # the loader `captioner evaluate` uses
from .data.synthetic import make_synthetic
from .decoding import DecodeOptions
from .engine import caption_batches, evaluate
from .training import fit, resolve_device

DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, DEMO_EPOCHS = 1200, 100, 5
DEMO_DECODING = DecodeOptions(beam_size=3, max_len=30)  # how the held-out scenes are scored and captioned


def demo_config(data, run: Path, device: str, epochs: int, val_images: int, seed: int = 0) -> RunConfig:
    """The demo's training run: the default model on `data`'s synthetic scenes (make_synthetic), validated each
    epoch on the first half of the `val_images` held-out ones (the final score uses all of them)."""
    cfg = RunConfig()
    cfg.data.train_captions, cfg.data.train_images = str(data.train_captions), str(data.train_images)
    cfg.data.val_captions, cfg.data.val_images = str(data.val_captions), str(data.val_images)
    cfg.data.val_limit = val_images // 2
    cfg.train.out, cfg.train.epochs, cfg.train.device, cfg.train.seed = str(run), epochs, device, seed
    return cfg


def run_demo(out: str | Path, device: str = "auto", progress: bool = True) -> dict:
    out = Path(out)
    started = time.time()
    data = make_synthetic(out / "data", DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, seed=0)
    print(f"[demo] wrote {DEMO_TRAIN_IMAGES} + {DEMO_VAL_IMAGES} synthetic scenes to {data.root}", flush=True)

    cfg = demo_config(data, out / "run", device, DEMO_EPOCHS, DEMO_VAL_IMAGES)
    fit(cfg, progress=progress, overwrite=True)  # the demo makes its folder anew each time
    print(f"[demo] trained {DEMO_EPOCHS} epochs in {time.time() - started:.0f}s", flush=True)

    checkpoint = out / "run" / "best.pt"
    torch_device = resolve_device(device)
    model, tokenizer, saved = load_model(checkpoint, torch_device)
    val_records = load_coco(data.val_captions, data.val_images)
    loader = evaluation_loader(val_records, saved.data.image_size, batch_size=32)
    metrics = evaluate(model, loader, tokenizer, torch_device, DEMO_DECODING).metrics
    print("[demo] held-out BLEU (beam 3): " + json.dumps({k: round(v, 4) for k, v in metrics.items()
                                                         if k.startswith("Bleu")}), flush=True)
    examples = evaluation_loader(val_records[:4], saved.data.image_size, batch_size=4)
    for batch, hyps in caption_batches(model, examples, tokenizer, torch_device, DEMO_DECODING):
        for path, refs, per_image in zip(batch.paths, batch.captions, hyps):
            print(f"[demo] {Path(path).name}\n    model:     {per_image[0][0]}\n    reference: {refs[0]}")
    metrics["seconds"] = round(time.time() - started, 1)
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"[demo] done in {metrics['seconds']}s; checkpoint {checkpoint}; try:\n"
          f"    captioner caption --checkpoint {checkpoint} {data.val_images}", flush=True)
    return metrics
