"""The training step with the loss over the real caption positions only (what training does) against the loss over
the whole (C, T, V) logits, padding included (what it did before), in one process; prints JSON.

    python scripts/benchmark_packed_loss.py                          # Flickr8k from ../shared/data/flickr8k
    python scripts/benchmark_packed_loss.py --root FLICKR8K --batch-size 64 --steps 10 --rounds 3

It times the decoder side of the Flickr8k recipe's step (configs/flickr8k_scratch.json with the trunk frozen, fed
random features of the cached size, so that no image is decoded): bridge, decoder, loss, backward and AdamW,
on batches of real training captions (all five of each image) over the recipe's vocabulary. The two settings take
turns, round after round, on the same batches; each figure is the median round.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the captioner package of this checkout, installed or not

from captioner.config import RunConfig  # noqa: E402
from captioner.data.collate import Batch, teacher_forcing_tensors  # noqa: E402
from captioner.data.flickr8k import load_flickr8k  # noqa: E402
from captioner.engine import caption_loss_of  # noqa: E402
from captioner.models.captioner import Captioner  # noqa: E402
from captioner.text import PAD_ID, Tokenizer  # noqa: E402

CAPTIONS_PER_IMAGE = 5


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "flickr8k"), help="Flickr8k folder")
    p.add_argument("--config", default=str(REPO / "configs" / "flickr8k_scratch.json"))
    p.add_argument("--batch-size", type=int, default=64, help="images per step (five captions each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"no Flickr8k folder at {root} (give --root)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    random.seed(0)
    device = torch.device(args.device)
    cfg = RunConfig.load(args.config)
    records = load_flickr8k(root, "train")
    tokenizer = Tokenizer.train((c for r in records for c in r.captions), cfg.train.vocab_size)
    cfg.model.vocab_size, cfg.model.trainable_layers = tokenizer.vocab_size, 0
    model = Captioner(cfg.model, load_encoder_weights=False).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = cfg.data.image_size
    with torch.no_grad():  # the frozen trunk's output shape at the recipe's image size
        feature_shape = model.encoder.forward_prefix(torch.zeros(1, 3, size, size, device=device)).shape[1:]

    batches = []
    for _ in range(args.steps + 1):  # the first is the warm-up
        chosen = random.sample(records, min(args.batch_size, len(records)))
        captions = [tokenizer.encode(c)[: cfg.model.max_len - 1] for r in chosen
                    for c in r.captions[:CAPTIONS_PER_IMAGE]]
        index = torch.tensor([i for i, r in enumerate(chosen) for _ in r.captions[:CAPTIONS_PER_IMAGE]])
        tokens_in, targets = teacher_forcing_tensors(captions)
        features = torch.randn(len(chosen), *feature_shape).contiguous(memory_format=torch.channels_last)
        batches.append((features, tokens_in, targets, index))

    def step(features, tokens_in, targets, index, packed: bool) -> float:
        layout = model.caption_layout(tokens_in, index, features.shape[0])
        features, tokens_in, targets, index = (t.to(device) for t in (features, tokens_in, targets, index))
        out = model.forward_train(None, tokens_in, index, prefix_features=features,
                                  layout=None if layout is None else layout.to(device), packed_logits=packed)
        batch = Batch(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), tokens_in, targets, index, [], [], [], [], 0)
        loss = caption_loss_of(out.logits, batch, cfg.train.label_smoothing, out.rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    first = step(*batches[0], packed=False)
    model.load_state_dict(state)
    torch.manual_seed(1)  # the same dropout masks
    same_loss = abs(step(*batches[0], packed=True) - first) <= 1e-4 * abs(first)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for packed in ((False, True) if round_ % 2 == 0 else (True, False)):
            started = time.perf_counter()
            for batch in batches[1:]:
                step(*batch, packed=packed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[packed].append((time.perf_counter() - started) / args.steps)
    padded, real = (statistics.median(seconds[k]) for k in (False, True))
    positions = sum(t.numel() for _, t, _, _ in batches[1:])
    real_positions = sum(int((t != PAD_ID).sum()) for _, t, _, _ in batches[1:])
    threads = f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else threads,
        "vocabulary": tokenizer.vocab_size, "images_per_step": args.batch_size,
        "captions_per_step": args.batch_size * CAPTIONS_PER_IMAGE,
        "real_share_of_positions": round(real_positions / positions, 3),
        "same_loss": same_loss,
        "ms_per_step_loss_over_all_positions": round(1000 * padded, 1),
        "ms_per_step_loss_over_real_positions": round(1000 * real, 1),
        "speedup": round(padded / real, 3),
        "rounds_ms_all_positions": [round(1000 * s, 1) for s in seconds[False]],
        "rounds_ms_real_positions": [round(1000 * s, 1) for s in seconds[True]],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
