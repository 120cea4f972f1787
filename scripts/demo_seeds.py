"""How much the demo's result moves with the training seed: the demo's training (`captioner demo`: the default
model, 5 epochs on 1,200 synthetic scenes) once per seed, each scored on the 100 held-out scenes with beam 3 as
the demo scores it; prints one JSON line per seed, then the range and mean.

    python scripts/demo_seeds.py --out /tmp/demo_seeds                 # seeds 0-4, about 6 minutes on 2 CPU cores
    python scripts/demo_seeds.py --out /tmp/smoke --seeds 0 --train-images 32 --val-images 8 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from captioner.checkpoint import load_model
from captioner.config import RunConfig
from captioner.data.coco import load_coco
from captioner.data.factory import evaluation_loader
from captioner.data.synthetic import make_synthetic
from captioner.demo import DEMO_DECODING, DEMO_EPOCHS, DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, demo_config
from captioner.engine import evaluate
from captioner.training import fit


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the scenes and one run per seed (runs are replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--train-images", type=int, default=DEMO_TRAIN_IMAGES)
    p.add_argument("--val-images", type=int, default=DEMO_VAL_IMAGES)
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out, device = Path(args.out), torch.device(args.device)
    data = make_synthetic(out / "data", args.train_images, args.val_images, seed=0)  # the demo's scenes
    held_out = evaluation_loader(load_coco(data.val_captions, data.val_images), RunConfig().data.image_size,
                                 batch_size=32)
    rows = []
    for seed in args.seeds:
        cfg = demo_config(data, out / f"seed{seed}", args.device, args.epochs, args.val_images, seed)
        started = time.time()
        result = fit(cfg, progress=False, overwrite=True)
        model, tokenizer, _ = load_model(out / f"seed{seed}" / "best.pt", device)
        metrics = evaluate(model, held_out, tokenizer, device, DEMO_DECODING).metrics
        rows.append({"seed": seed, "held_out_bleu_4": round(metrics["Bleu_4"], 4),
                     "final_train_loss": round(result["history"][-1]["train_loss"], 4),
                     "seconds": round(time.time() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    bleu, loss = [r["held_out_bleu_4"] for r in rows], [r["final_train_loss"] for r in rows]
    print(json.dumps({"seeds": len(rows), "bleu_4_min": min(bleu), "bleu_4_max": max(bleu),
                      "bleu_4_mean": round(sum(bleu) / len(bleu), 4), "loss_min": min(loss), "loss_max": max(loss),
                      "loss_mean": round(sum(loss) / len(loss), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
