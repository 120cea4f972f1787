"""Decoding benchmark: captions/s of greedy and batched beam search, from precomputed memory and from image
files, against the naive per-image beam search without a cache, all in one process on one device.

Without --checkpoint the model is a randomly initialised default-size captioner. A random model rarely emits
eos, so every caption runs to max_len: the worst case for both sides, and the same work for both. With a
trained checkpoint, captions end early and both sides get faster.
"""

from __future__ import annotations

import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig
from ..data.coco import load_coco
from ..data.factory import evaluation_loader
from ..data.images import list_images
from ..data.records import ImageRecord
from ..decoding import DecodeOptions, decode
from ..engine import autocast_for, caption_batches, encode_split
from ..models.captioner import Captioner
from .naive import naive_beam_search

SETTINGS = {"greedy": 1, "beam3": 3, "beam5": 5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _random_model(vocab_size: int, device: torch.device) -> Captioner:
    torch.manual_seed(0)
    return Captioner(ModelConfig(vocab_size=vocab_size)).eval().to(device)


def _image_records(folder: str | None, count: int, workdir: Path) -> list[ImageRecord]:
    """`count` images from `folder`, or that many 320x240 synthetic scenes written to `workdir`."""
    if folder:
        paths = list_images([folder])[:count]
    else:
        from ..data.synthetic import make_synthetic

        written = make_synthetic(workdir, num_train=count, num_val=0, seed=0)
        paths = [r.path for r in load_coco(written.train_captions, written.train_images)]
    return [ImageRecord(image_id=str(p), path=Path(p), captions=()) for p in paths]


def _time_from_memory(model, memory: torch.Tensor, options: DecodeOptions, batch_size: int,
                      device: torch.device) -> dict:
    with autocast_for(device):
        decode(model, memory[:batch_size], options)  # warm-up: kernels, allocator
    _sync(device)
    _reset_peak(device)
    tokens, started = 0, time.perf_counter()
    for i in range(0, memory.shape[0], batch_size):
        with autocast_for(device):
            hyps = decode(model, memory[i : i + batch_size], options)
        tokens += sum(len(per_image[0].tokens) for per_image in hyps)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"captions_per_s": round(memory.shape[0] / seconds, 1), "seconds": round(seconds, 3),
            "mean_tokens": round(tokens / memory.shape[0], 2), "peak_memory_mb": round(_peak_memory_mb(device), 1)}


def _time_from_files(model, records, tokenizer, image_size: int, options: DecodeOptions, batch_size: int,
                     device: torch.device) -> dict:
    """JPEG decode + resize + encode + decode, as `captioner caption` does it."""
    _reset_peak(device)
    started = time.perf_counter()
    count = 0
    for _, hyps in caption_batches(model, evaluation_loader(records, image_size, batch_size), tokenizer, device,
                                   options):
        count += len(hyps)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"captions_per_s": round(count / seconds, 1), "seconds": round(seconds, 3),
            "peak_memory_mb": round(_peak_memory_mb(device), 1)}


def _time_naive(model, memory: torch.Tensor, beam_size: int, max_len: int, device: torch.device) -> dict:
    naive_beam_search(model, memory[:1], beam_size, max_len)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for i in range(memory.shape[0]):
        with autocast_for(device):
            naive_beam_search(model, memory[i : i + 1], beam_size, max_len)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"captions_per_s": round(memory.shape[0] / seconds, 2), "seconds": round(seconds, 3),
            "images": memory.shape[0]}


def run_decode_benchmark(checkpoint: str | None = None, device: str = "auto", num_images: int = 256,
                         batch_size: int = 64, naive_images: int = 16, max_len: int = 20, image_folder: str | None = None,
                         vocab_size: int = 4000, file_images: int = 0) -> dict:
    """Measure and return the figures as a dict (see module docstring). `file_images` (0 = num_images) limits the
    end-to-end runs from files, which on a CPU are dominated by the encoder."""
    from ..checkpoint import load_model
    from ..training import resolve_device

    torch_device = resolve_device(device)
    if checkpoint:
        model, tokenizer, cfg = load_model(checkpoint, torch_device)
        image_size, source = cfg.data.image_size, str(checkpoint)
    else:
        model, source = _random_model(vocab_size, torch_device), "random default-size model"
        image_size = DataConfig().image_size
        tokenizer = _PlaceholderTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        records = _image_records(image_folder, num_images, Path(tmp))
        loader = evaluation_loader(records, image_size, batch_size)
        memory = encode_split(model, loader, torch_device)[0]  # (num_images, N, D)
        result = {
            "benchmark": "decode", "model": source, "device": _device_name(torch_device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "images": memory.shape[0],
            "memory_tokens": memory.shape[1], "batch_size": batch_size, "max_len": max_len,
            "autocast": "bf16" if torch_device.type == "cuda" else "fp32",
            "from_memory": {}, "from_files": {}, "naive_per_image": {},
        }
        file_records = records[: file_images or len(records)]
        for name, beam in SETTINGS.items():
            options = DecodeOptions(beam_size=beam, max_len=max_len)
            result["from_memory"][name] = _time_from_memory(model, memory, options, batch_size, torch_device)
            result["from_files"][name] = _time_from_files(model, file_records, tokenizer, image_size, options,
                                                          batch_size, torch_device)
        for name in ("beam3",):
            result["naive_per_image"][name] = _time_naive(model, memory[:naive_images], SETTINGS[name], max_len,
                                                          torch_device)
            batched = result["from_memory"][name]["captions_per_s"]
            result[f"speedup_{name}_vs_naive"] = round(batched / result["naive_per_image"][name]["captions_per_s"], 1)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


class _PlaceholderTokenizer:
    """Stands in for a tokenizer when the model is random: turns ids into text without a vocabulary."""

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="a trained checkpoint (default: a random default-size model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=256, help="images to caption (synthetic unless --image-folder)")
    p.add_argument("--image-folder", help="caption these images instead of generated synthetic scenes")
    p.add_argument("--file-images", type=int, default=0, help="images for the end-to-end runs (0 = --images)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--naive-images", type=int, default=16, help="images the slow per-image baseline decodes")
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=4000, help="vocabulary of the random model")
    p.add_argument("--out", help="also write the JSON here")


def run_from_args(args) -> int:
    result = run_decode_benchmark(args.checkpoint, args.device, args.images, args.batch_size, args.naive_images,
                                  args.max_len, args.image_folder, args.vocab_size, args.file_images)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0

