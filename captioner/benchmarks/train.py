"""Training benchmark: images/s of training steps end to end from JPEG files and from cached features, against
a plain baseline (fp32, PIL loading in the training process, no cache), all in one process on one device.

The data is generated: synthetic scenes drawn at COCO's size (640x480 JPEGs at quality 90, five captions each).
Every figure comes from the project's own training step (`engine.train_one_epoch`) on the default-size model:

- baseline: frozen trunk run in every step, fp32, PIL decoding in the training process, no cache;
- frozen_from_jpeg: frozen trunk, PIL decoding in DataLoader workers, pinned memory, channels_last, bf16 autocast
  on CUDA;
- with `--pack-size S`: frozen_from_packed_jpeg, the same from copies packed to a shorter side of S
  (`pack-images --size S`), and frozen_from_square_jpeg, from copies stretched to S x S (`pack-images --size S
  --square`), which leave the workers no resizing to do;
- loading_from_jpeg (and with `--pack-size`, loading_from_packed_jpeg and loading_from_square_jpeg): the DataLoader
  alone, no model, with the same workers: the most images/s a step fed from those files could reach;
- CUDA only: frozen_gpu_decode (workers read bytes, nvjpeg decodes and resizes the batch on the GPU) and
  frozen_gpu_decode_prefetch (the same, decoding batch k+1 on a side stream while batch k trains);
- finetune_from_jpeg: the whole trunk trained (`--trainable-layers 5`), with the fastest loading of the device;
- extract: filling the on-disk FeatureStore with the frozen trunk's output;
- cached_features: training from that store, so a step is the bridge and the decoder only;
- CPU only: cached_features_cpu_bf16, the same under bf16 autocast (`train --cpu-bf16`);
- with `--compile`: frozen_from_jpeg_compiled, frozen_from_packed_jpeg_compiled and cached_features_compiled, the
  same settings with the training forward under `torch.compile` (what `train --compile` runs); compilation happens
  in the warm-up batches, so the timed batches see the compiled code;
- with `--more-batch-sizes B ...`: frozen_from_jpeg_batchB, frozen_from_packed_jpeg_batchB and cached_features_batchB,
  the same settings in batches of B images: a step bound by per-step overhead (Python, kernel launches, host
  synchronisations) gets faster per image as B grows, one bound by the work per image does not;
- with `--coco-epoch` (CUDA): a COCO-sized epoch, 113,287 records over the generated files (each file stands
  for many records), extracted into a fresh store and then trained for one whole epoch from it, timed.

Timing: each setting draws from one loader iterator; the first 2 x workers + 1 batches are a warm-up (the
workers' queue, filled before timing starts, would otherwise flatter a data-bound setting), then `--batches`
are timed. Captions: `--captions-per-image` of the five per image, all trained in each step. Peak memory:
CUDA's peak allocated per setting; on CPU the process's peak resident set so far (an upper bound).

Rounds: a shared machine's speed drifts by tens of percent within minutes, which one pass per setting reads as a
difference between settings. `--rounds N` runs the whole sequence of settings N times, in turn, and reports each
setting's median round (its per-round images/s under `images_per_s_rounds`), so the ratios compare settings timed
side by side.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..config import ModelConfig
from ..data.coco import load_coco
from ..data.collate import CaptionCollate
from ..data.dataset import CaptionDataset
from ..data.device_decode import DeviceDecodingLoader
from ..data.records import ImageRecord
from ..data.sampling import EpochSampler
from ..engine import compile_training_forward, fill_feature_store, train_one_epoch
from ..errors import CaptionerError
from ..feature_cache import FeatureStore
from ..models.captioner import Captioner
from ..text import Tokenizer
from .decode import _device_name, _peak_memory_mb, _reset_peak, _sync

log = logging.getLogger(__name__)

COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval: the usual "one COCO epoch"


@dataclass
class TrainBenchmarkOptions:
    device: str = "auto"
    images: int = 256  # distinct 640x480 JPEGs generated
    batch_size: int = 32
    batches: int = 6  # timed batches per setting, after the warm-up
    baseline_batches: int = 0  # 0 = `batches`; the baseline is slow on a GPU machine, a few batches suffice there
    finetune_batches: int = 2
    image_size: int = 224
    workers: int = 2  # DataLoader workers of the fast settings
    captions_per_image: int = 5
    coco_epoch: bool = False
    decode_threads: tuple[int, ...] = ()  # CUDA: also time prefetching with these nvjpeg thread counts
    only: tuple[str, ...] = ()  # run only these settings (the baseline always runs: ratios need it)
    pack_size: int = 0  # also time the frozen trunk from copies packed to this shorter side (0 = off)
    rounds: int = 1  # time every setting this many times, in turn, and report each one's median round
    compile: bool = False  # also time the fast settings with the training forward compiled (`train --compile`)
    more_batch_sizes: tuple[int, ...] = ()  # also time the fast settings at these batch sizes (NAME_batchB)


def _write_part(folder: str, count: int, seed: int) -> tuple[str, str]:
    from ..data.synthetic import make_synthetic

    written = make_synthetic(folder, num_train=count, num_val=0, seed=seed, width=640, height=480)
    for path in Path(written.train_images).iterdir():  # re-save at a photo-like quality
        Image.open(path).convert("RGB").save(path, quality=90)
    return str(written.train_captions), str(written.train_images)


def coco_sized_images(folder: Path, count: int, seed: int = 0, processes: int = 1) -> list[ImageRecord]:
    """`count` synthetic scenes as 640x480 JPEGs (quality 90) with five captions each -> ImageRecords.
    `processes` > 1 draws parts in parallel (distinct seeds per part)."""
    processes = max(1, min(processes, count))
    sizes = [count // processes + (i < count % processes) for i in range(processes)]
    jobs = [(str(folder / f"part{i}"), n, seed + i) for i, n in enumerate(sizes)]
    if processes == 1:
        parts = [_write_part(*jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.starmap(_write_part, jobs)
    return [r for captions, images in parts for r in load_coco(captions, images)]


def packed_copies(records: list[ImageRecord], source: Path, destination: Path, size: int,
                  square: bool = False) -> dict:
    """The images under `source` packed into `destination` as `captioner pack-images --size size [--square]`
    packs them (quality 85), `records` pointed at the copies (same captions), and what the packing cost."""
    from ..pack import pack_images

    summary = pack_images(source, destination, size=size, progress=False, square=square)
    packed = [ImageRecord(r.image_id, destination / Path(r.path).relative_to(source), r.captions) for r in records]
    return {"records": packed, "pack": {"size": size, "images": summary.packed, "seconds": summary.seconds,
                                        "images_per_s": round(summary.packed / max(summary.seconds, 1e-9), 1),
                                        "megabytes_before": round(summary.bytes_before / 1e6, 1),
                                        "megabytes_after": round(summary.bytes_after / 1e6, 1)}}


class _Results(dict):
    """The result dict, logging each setting as it lands (a run cut short by a time limit keeps what it measured)."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if isinstance(value, dict):
            log.info("%s: %s", key, json.dumps(value))


class _Repeated:
    """A sampler over several epochs of EpochSampler order, so warm-up and timed batches come from one iterator
    however many batches are asked for."""

    def __init__(self, num_items: int, epochs: int = 1000):
        self.sampler, self.epochs = EpochSampler(num_items, seed=0), epochs

    def __iter__(self):
        for epoch in range(1, self.epochs + 1):
            self.sampler.set_epoch(epoch)
            yield from self.sampler

    def __len__(self) -> int:
        return len(self.sampler) * self.epochs


def _loader(records, tokenizer, opts: TrainBenchmarkOptions, device: torch.device, workers: int,
            gpu_decode: str = "", store: FeatureStore | None = None, repeat: bool = True, threads: int = 1):
    """gpu_decode: "" (PIL), "inline" or "prefetch" (nvjpeg with `threads` threads; see data/device_decode.py)."""
    dataset = CaptionDataset(records, opts.image_size, cache_images=False, encoded=bool(gpu_decode))
    dataset.features = store
    sampler = _Repeated(len(records)) if repeat else EpochSampler(len(records), seed=0)
    loader = DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=CaptionCollate(tokenizer, 40, opts.captions_per_image),
                        pin_memory=device.type == "cuda", persistent_workers=False)
    if not gpu_decode:
        return loader
    return DeviceDecodingLoader(loader, device, prefetch=gpu_decode == "prefetch", threads=threads)


def _model(vocab_size: int, trainable_layers: int, device: torch.device) -> Captioner:
    """The whole ResNet18 trunk (stride 32, no grid convolutions or summary), the model the seed-style baseline
    and the README's figures use, whatever the training defaults are."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, trunk_stages=5, trainable_layers=trainable_layers, grid_convs=0,
                      grid_summary=False, bow_input="memory")
    model = Captioner(cfg, load_encoder_weights=False)
    return model.to(device).to(memory_format=torch.channels_last)


def _optimizer(model):
    from ..training import make_optimizer

    optimizer = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], 1e-4)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _time_training(model, loader, batches: int, device: torch.device, store: FeatureStore | None = None,
                   autocast: bool = True, warmup: int = 1, captions_per_image: int = 5, cpu_bf16: bool = False,
                   forward: Callable | None = None) -> dict:
    """forward: what the step calls instead of model.forward_train (a compiled one; it compiles in the warm-up)."""
    optimizer, scheduler = _optimizer(model)
    batches_in = iter(loader)
    train_one_epoch(model, islice(batches_in, warmup), optimizer, scheduler, device, 0, progress=False,
                    feature_store=store, amp=autocast, cpu_bf16=cpu_bf16, forward=forward)  # kernels, workers, queue
    _sync(device)
    _reset_peak(device)
    started = time.perf_counter()
    stats = train_one_epoch(model, islice(batches_in, batches), optimizer, scheduler, device, 0, progress=False,
                            feature_store=store, amp=autocast, cpu_bf16=cpu_bf16, forward=forward)
    _sync(device)
    seconds = time.perf_counter() - started
    del batches_in  # stops the workers (and a prefetch thread) now, not at the next setting
    return {"images_per_s": round(stats["images"] / seconds, 1),
            "captions_per_s": round(stats["images"] * captions_per_image / seconds, 1),
            "images": stats["images"], "seconds": round(seconds, 3),
            "peak_memory_mb": round(_peak_memory_mb(device), 1)}


def _time_extraction(model, loader, store: FeatureStore, device: torch.device) -> dict:
    started = time.perf_counter()
    count = fill_feature_store(model, loader, store, device)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": round(count / seconds, 1), "images": count, "seconds": round(seconds, 3)}


def _time_loading(loader, batches: int, warmup: int) -> dict:
    """The DataLoader alone, no model: how many images/s its workers (and, on CUDA, the pinning thread) deliver,
    i.e. the most a training step fed by it could reach."""
    batches_in = iter(loader)
    for _ in islice(batches_in, warmup):
        pass
    started, images = time.perf_counter(), 0
    for batch in islice(batches_in, batches):
        images += len(batch.image_ids)
    seconds = time.perf_counter() - started
    del batches_in
    return {"images_per_s": round(images / seconds, 1), "images": images, "seconds": round(seconds, 3)}


def _feature_shape(model, image_size: int, device: torch.device) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(model.encoder.forward_prefix(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])


def setting_names(opts: TrainBenchmarkOptions, cuda: bool) -> set[str]:
    """Every setting run_train_benchmark times with these options on this kind of device (what --only may name)."""
    sources = ("jpeg", "packed_jpeg", "square_jpeg") if opts.pack_size else ("jpeg",)
    twinned = {f"frozen_from_{source}" for source in sources} | {"cached_features"}
    twins = {f"{name}_batch{size}" for name in twinned for size in opts.more_batch_sizes}
    twins |= {f"{name}_compiled" for name in twinned} if opts.compile else set()
    names = {"baseline", "extract", "finetune_from_jpeg", *twinned, *twins,
             *(f"loading_from_{source}" for source in sources)}
    if cuda:
        names |= {"frozen_gpu_decode", "frozen_gpu_decode_prefetch",
                  *(f"frozen_gpu_decode_prefetch_threads{n}" for n in opts.decode_threads)}
        names |= {"frozen_gpu_decode_prefetch_packed"} if opts.pack_size else set()
    else:
        names.add("cached_features_cpu_bf16")
    return names


def run_train_benchmark(opts: TrainBenchmarkOptions) -> dict:
    from ..training import resolve_device

    device = resolve_device(opts.device)
    cuda = device.type == "cuda"
    known = setting_names(opts, cuda)
    unknown = sorted(set(opts.only) - known)
    if unknown:  # before the images are generated: a typo must not cost a run that times nothing asked for
        raise CaptionerError(f"--only: with these options on {device.type}, no setting is named "
                             f"{', '.join(unknown)} (--pack-size adds the packed and square ones, --compile the "
                             f"_compiled ones, --more-batch-sizes the _batchB ones; known: {', '.join(sorted(known))})")
    if opts.coco_epoch and not cuda:
        raise CaptionerError("--coco-epoch needs a CUDA device (113,287 images through a CPU take hours)")
    warmup = 2 * opts.workers + 1
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        records = coco_sized_images(Path(tmp) / "images", opts.images, processes=max(1, multiprocessing.cpu_count()))
        tokenizer = Tokenizer.train(c for r in records for c in r.captions)
        result = _Results({"benchmark": "train", "device": _device_name(device), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "cpu_cores": multiprocessing.cpu_count(),
                  "image_file_size": "640x480 JPEG q90", "generate_seconds": round(time.perf_counter() - started, 1),
                  "autocast": "bf16" if cuda else "fp32", "warmup_batches": warmup, **asdict(opts)})
        frozen = _model(tokenizer.vocab_size, 0, device)
        cpi = opts.captions_per_image

        def timed(model, loader, batches=opts.batches, **kw):
            return _time_training(model, loader, batches, device, captions_per_image=cpi, **kw)

        runs: dict[str, Callable[[], dict]] = {}  # every timed setting, to be timed again in later rounds
        wanted = lambda name: not opts.only or name in opts.only  # noqa: E731
        wanted_family = lambda name: not opts.only or any(n.startswith(name) for n in opts.only)  # noqa: E731

        def measure(name: str, run: Callable[[], dict]) -> None:
            assert name in known, f"{name} is missing from setting_names"
            runs[name] = run
            result[name] = run()

        def measure_twins(name: str, timed_with: Callable[[Callable | None, TrainBenchmarkOptions], dict]) -> None:
            """Time setting `name` eager if wanted; with --compile its compiled twin NAME_compiled, and for each
            size B of --more-batch-sizes its twin NAME_batchB (eager, batches of B images). A twin is wanted with
            its setting, or named in --only on its own. `timed_with(forward, options)` times one of them."""
            if wanted(name):
                measure(name, lambda: timed_with(None, opts))
            if opts.compile and (wanted(name) or wanted(f"{name}_compiled")):
                measure(f"{name}_compiled", lambda: timed_with(compile_training_forward(frozen.forward_train), opts))
            for size in opts.more_batch_sizes:
                if wanted(name) or wanted(f"{name}_batch{size}"):
                    measure(f"{name}_batch{size}", lambda size=size: timed_with(None, replace(opts, batch_size=size)))

        measure("baseline", lambda: timed(frozen, _loader(records, tokenizer, opts, device, 0),
                                          opts.baseline_batches or opts.batches, autocast=False))
        sources = {"jpeg": records}  # the images each from_* setting reads
        if opts.pack_size:
            for name, square in (("packed_jpeg", False), ("square_jpeg", True)):
                if wanted_family(f"frozen_from_{name}") or wanted(f"loading_from_{name}") or (
                        name == "packed_jpeg" and wanted("frozen_gpu_decode_prefetch_packed")):
                    packed = packed_copies(records, Path(tmp) / "images", Path(tmp) / name, opts.pack_size, square)
                    result["pack" if name == "packed_jpeg" else "pack_square"] = packed["pack"]
                    sources[name] = packed["records"]
        for name, images in sources.items():
            if wanted(f"loading_from_{name}"):
                measure(f"loading_from_{name}", lambda images=images: _time_loading(
                    _loader(images, tokenizer, opts, device, opts.workers), opts.batches, warmup))
        for name, images in sources.items():
            measure_twins(f"frozen_from_{name}", lambda forward, o, images=images: timed(
                frozen, _loader(images, tokenizer, o, device, opts.workers), warmup=warmup, forward=forward))
        if cuda and "packed_jpeg" in sources and wanted("frozen_gpu_decode_prefetch_packed"):
            measure("frozen_gpu_decode_prefetch_packed", lambda: timed(
                frozen, _loader(sources["packed_jpeg"], tokenizer, opts, device, opts.workers, "prefetch"),
                warmup=warmup))
        fastest, threads = "", 1
        if cuda:
            fastest, threads = "prefetch", 1
            settings = [("frozen_gpu_decode", "inline", 1), ("frozen_gpu_decode_prefetch", "prefetch", 1)]
            settings += [(f"frozen_gpu_decode_prefetch_threads{n}", "prefetch", n) for n in opts.decode_threads]
            for name, mode, n in settings:
                if wanted(name):
                    measure(name, lambda mode=mode, n=n: timed(
                        frozen, _loader(records, tokenizer, opts, device, opts.workers, mode, threads=n),
                        warmup=warmup))
        if wanted("finetune_from_jpeg"):  # a fresh model per round, freed before the next setting is timed
            measure("finetune_from_jpeg", lambda: timed(
                _model(tokenizer.vocab_size, 5, device),
                _loader(records, tokenizer, opts, device, opts.workers, fastest, threads=threads),
                opts.finetune_batches, warmup=warmup))

        store = FeatureStore.open(Path(tmp) / "features", {"benchmark": True}, len(records),
                                  _feature_shape(frozen, opts.image_size, device))
        if wanted("extract") or wanted_family("cached_features"):
            result["extract"] = _time_extraction(frozen, _loader(records, tokenizer, opts, device, opts.workers,
                                                                 fastest, repeat=False, threads=threads), store, device)
        # On 2 CPU cores workers would only copy memory-mapped rows between processes; a GPU machine's cores
        # tokenise captions and gather rows in parallel.
        cached_workers = opts.workers if cuda else 0
        measure_twins("cached_features", lambda forward, o: timed(
            frozen, _loader(records, tokenizer, o, device, cached_workers, store=store), store=store,
            warmup=2 * cached_workers + 1, forward=forward))
        if not cuda and wanted("cached_features_cpu_bf16"):  # train --cpu-bf16
            measure("cached_features_cpu_bf16", lambda: timed(
                frozen, _loader(records, tokenizer, opts, device, 0, store=store), store=store, cpu_bf16=True))
        _more_rounds(result, runs, opts.rounds)
        if opts.coco_epoch:
            result["coco_epoch"] = _coco_epoch(frozen, records, tokenizer, opts, device, Path(tmp))
    baseline = result["baseline"]["images_per_s"]
    for name in [k for k, v in result.items() if isinstance(v, dict) and "captions_per_s" in v and k != "baseline"]:
        result[f"{name}_vs_baseline"] = round(result[name]["images_per_s"] / baseline, 2)
    if "cached_features" in result:
        result["coco_epoch_seconds_cached_estimate"] = round(
            COCO_TRAIN_IMAGES / result["cached_features"]["images_per_s"], 1)
    return dict(result)


def _more_rounds(result: dict, runs: dict[str, Callable[[], dict]], rounds: int) -> None:
    """Time every setting of `runs` rounds - 1 more times, in the order of the first round, and keep each one's
    median round (by images/s) in `result`, with all its rounds' images/s."""
    if rounds <= 1:
        return
    timings = {name: [result[name]] for name in runs}
    for round_number in range(2, rounds + 1):
        for name, run in runs.items():
            timings[name].append(run())
            log.info("round %d of %d: %s %.1f images/s", round_number, rounds, name, timings[name][-1]["images_per_s"])
    for name, measured in timings.items():
        ordered = sorted(measured, key=lambda m: m["images_per_s"])
        result[name] = {**ordered[(len(ordered) - 1) // 2], "images_per_s_rounds": [m["images_per_s"] for m in measured]}


def _coco_epoch(model, records, tokenizer, opts: TrainBenchmarkOptions, device: torch.device, tmp: Path) -> dict:
    """Extract then train one whole epoch of COCO_TRAIN_IMAGES records (the generated files, reused in turn)."""
    coco = [records[i % len(records)] for i in range(COCO_TRAIN_IMAGES)]
    store = FeatureStore.open(tmp / "coco_features", {"benchmark": "coco"}, len(coco),
                              _feature_shape(model, opts.image_size, device))
    extract = _time_extraction(model, _loader(coco, tokenizer, opts, device, opts.workers, "prefetch", repeat=False,
                                              threads=1), store, device)
    optimizer, scheduler = _optimizer(model)
    loader = _loader(coco, tokenizer, opts, device, opts.workers, store=store, repeat=False)
    _sync(device)
    started = time.perf_counter()
    stats = train_one_epoch(model, loader, optimizer, scheduler, device, 1, progress=False, feature_store=store)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"records": len(coco), "distinct_files": len(records), "extract": extract,
            "train_epoch_seconds": round(seconds, 1), "images": stats["images"],
            "captions": stats["images"] * opts.captions_per_image,
            "captions_per_s": round(stats["images"] * opts.captions_per_image / seconds, 1)}


def add_arguments(p) -> None:
    defaults = TrainBenchmarkOptions()
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--images", type=int, default=defaults.images, help="distinct synthetic 640x480 JPEGs to generate")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--batches", type=int, default=defaults.batches, help="timed batches per setting (after warm-up)")
    p.add_argument("--baseline-batches", type=int, default=0, help="timed batches of the baseline (0 = --batches)")
    p.add_argument("--finetune-batches", type=int, default=defaults.finetune_batches,
                   help="timed batches with the whole trunk trained")
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers of the fast settings")
    p.add_argument("--captions-per-image", type=int, default=defaults.captions_per_image,
                   help="captions trained per image per step (training's default is 2)")
    p.add_argument("--coco-epoch", action="store_true",
                   help="CUDA: also extract and train one whole COCO-sized epoch (113,287 records) from the cache")
    p.add_argument("--decode-threads", default="", help="CUDA: also time prefetching with these comma-separated "
                   "nvjpeg thread counts (e.g. 4,8)")
    p.add_argument("--only", nargs="+", default=(), metavar="SETTING",
                   help="run only these settings (e.g. frozen_gpu_decode_prefetch_threads4 cached_features)")
    p.add_argument("--pack-size", type=int, default=0, help="also pack the generated JPEGs to this shorter side, "
                   "and to this square size, as captioner pack-images [--square] does, and time loading and the "
                   "frozen trunk from those copies (0 = off)")
    p.add_argument("--rounds", type=int, default=defaults.rounds, help="time every setting this many times, in "
                   "turn, and report each one's median round (a shared machine's speed drifts)")
    p.add_argument("--compile", action="store_true", help="also time frozen_from_jpeg, frozen_from_packed_jpeg "
                   "and cached_features with the training forward under torch.compile (as `train --compile`)")
    p.add_argument("--more-batch-sizes", type=int, nargs="+", default=(), metavar="B",
                   help="also time frozen_from_jpeg, frozen_from_packed_jpeg and cached_features in batches of B "
                   "images (NAME_batchB): whether images/s grows with the batch says whether a step is bound by "
                   "per-step overhead or by the work per image")
    p.add_argument("--out", help="also write the JSON here")


def options_from_args(args) -> TrainBenchmarkOptions:
    return TrainBenchmarkOptions(args.device, args.images, args.batch_size, args.batches, args.baseline_batches,
                                 args.finetune_batches, args.image_size, args.workers, args.captions_per_image,
                                 args.coco_epoch, tuple(int(n) for n in args.decode_threads.split(",") if n),
                                 tuple(args.only), args.pack_size, args.rounds, args.compile,
                                 tuple(args.more_batch_sizes))


def run_from_args(args) -> int:
    result = run_train_benchmark(options_from_args(args))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
