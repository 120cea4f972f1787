"""What each CLI subcommand does, given its parsed arguments. Library calls plus printing, nothing more."""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path


from .checkpoint import check_writable_file, check_writable_folder
from .data.factory import evaluation_loader, load_records
from .data.images import list_images, load_image
from .data.records import ImageRecord
from .decoding import DecodeOptions
from .engine import decode_batches, evaluate as evaluate_loader
from .ensemble import load_models
from .errors import CaptionerError
from .report import write_coco_results, write_error_report, write_per_image_scores
from .training import fit, resolve_device
from .training_data import existing_feature_store


def split_records(args) -> list[ImageRecord]:
    """The dataset flags of `evaluate`/`bleu-bench` -> the records of the split to score (--limit applied)."""
    split = "val" if args.split == "dev" else args.split
    if args.dataset == "coco" and (args.root or args.karpathy_json):
        raise CaptionerError("--dataset coco reads one split's --captions JSON and --images folder; --root and "
                             "--karpathy-json belong to flickr8k and karpathy")
    if args.dataset != "coco" and (args.captions or args.images):
        raise CaptionerError(f"--dataset {args.dataset} finds its files under --root; --captions and --images "
                             "belong to coco")
    records = load_records(args.dataset, split, captions=args.captions, images=args.images, root=args.root,
                           karpathy_json=args.karpathy_json)
    return records[: args.limit] if args.limit else records


def decode_options(args) -> DecodeOptions:
    """The decoding flags of `caption`/`evaluate` as DecodeOptions; a bad combination is a usage error."""
    try:
        return DecodeOptions(beam_size=args.beam_size, max_len=args.max_len, min_len=args.min_len,
                             length_penalty=args.length_penalty, length_norm=args.length_norm,
                             num_return=args.num_captions, no_repeat_ngram=args.no_repeat_ngram, sample=args.sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise CaptionerError(f"decoding flags: {exc}") from None


def extract_features(args) -> int:
    """Fill the frozen-prefix feature cache of the run `train` would start with the same flags."""
    from .train_cli import config_from_args, given_train_settings, typed_model_settings

    result = fit(config_from_args(args), resume=args.resume, progress=not args.no_progress, extract_only=True,
                 resume_changes=given_train_settings(args), typed_model=typed_model_settings(args))
    if result.pop("rank") == 0:
        print(json.dumps(result))
    return 0


def pretrain_trunk(args) -> int:
    """Train the trunk on the captions' words alone and write OUT/trunk_pretrained.pt for --encoder-weights."""
    from .pretrain import pretrain_trunk as run_pretraining, pretraining_settings
    from .shared_trunks import SharedTrunk
    from .train_cli import config_from_args
    from .training import PRETRAINED_TRUNK, seed_everything
    from .training_data import train_and_val_records

    if args.resume:
        raise CaptionerError("pretrain-trunk cannot resume: an interrupted pre-training starts over")
    cfg = config_from_args(args)
    cfg.check()
    if cfg.train.trunk_pretrain_epochs < 1:
        raise CaptionerError("pretrain-trunk: give --trunk-pretrain-epochs N (N >= 1), in flags or the config file")
    out = check_writable_folder(cfg.train.out)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    train_records, val_records = train_and_val_records(cfg)
    path, settings = (out / PRETRAINED_TRUNK).absolute(), pretraining_settings(cfg, train_records, val_records)
    cache = cfg.train.trunk_pretrain_cache
    # With a cache, stored there for the runs given the same settings; they wait for it meanwhile
    with SharedTrunk(Path(cache), settings) if cache else nullcontext() as shared:
        summary = run_pretraining(cfg, train_records, val_records, path, resolve_device(cfg.train.device),
                                  progress=not args.no_progress, settings=settings)
        if shared is not None:
            shared.store(path)
    best_map = summary["best_val_map"]
    print(json.dumps({"path": summary["path"], "best_epoch": summary["best_epoch"],
                      "best_val_map": None if math.isnan(best_map) else best_map, "tags": len(summary["tags"])}))
    return 0


def train(args) -> int:
    from .curves import require_tensorboard
    from .train_cli import config_from_args, given_train_settings, typed_model_settings

    cfg = config_from_args(args)
    if cfg.train.tensorboard:
        require_tensorboard()  # before any work: the missing package is named, not found after an epoch
    result = fit(cfg, resume=args.resume, progress=not args.no_progress, resume_changes=given_train_settings(args),
                 typed_model=typed_model_settings(args), overwrite=args.overwrite)
    if result["rank"] == 0:  # under torchrun, one line for the whole run
        print(json.dumps({"out": result["out"], "best_val_Bleu_4": result["best_bleu_4"],
                          "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"]}))
    return 0


def evaluate(args) -> int:
    options = decode_options(args)
    for flag, path in (("--out", args.out), ("--results", args.results), ("--per-image", args.per_image),
                       ("--report", args.report)):
        if path:  # before decoding: a typo in an output path must not cost the split's decoding
            check_writable_file(path, flag)
    device = resolve_device(args.device)
    model, tokenizer, cfg = load_models(args.checkpoint, device)
    records = split_records(args)
    loader = evaluation_loader(records, cfg.data.image_size, args.batch_size)
    if len(args.checkpoint) == 1:  # an ensemble's members each run their whole trunk
        loader.dataset.features = existing_feature_store(cfg, model, records, device)  # skips cached images' JPEGs
    evaluation = evaluate_loader(model, loader, tokenizer, device, options, progress=sys.stderr.isatty(),
                                 metrics=args.metrics)
    ensemble = {"ensemble": args.checkpoint} if len(args.checkpoint) > 1 else {}
    metrics = dict(evaluation.metrics, checkpoint="+".join(args.checkpoint), **ensemble, dataset=args.dataset,
                   split=args.captions if args.dataset == "coco" else args.split, decoding=options.to_dict())
    if evaluation.skipped_metrics:
        metrics["skipped_metrics"] = evaluation.skipped_metrics
        for reason in evaluation.skipped_metrics.values():
            print(f"captioner evaluate: {reason}", file=sys.stderr)
    failed = loader.dataset.failed_paths  # each was logged by name as it was skipped
    if failed:
        print(f"captioner evaluate: {len(failed)} unreadable image(s) skipped", file=sys.stderr)
    if args.results:
        write_coco_results(args.results, evaluation.captions)
    if args.per_image:
        write_per_image_scores(args.per_image, evaluation)
    if args.report:
        write_error_report(args.report, evaluation, title=f"{metrics['checkpoint']} on {metrics['split']}")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return 1 if failed else 0


def caption(args) -> int:
    from . import visualize

    options = decode_options(args)
    device = resolve_device(args.device)
    if args.attention and len(args.checkpoint) > 1:
        raise CaptionerError("caption: --attention draws one model's attention; give one checkpoint with it")
    model, tokenizer, cfg = load_models(args.checkpoint, device)
    # A path that does not exist is captioned like an unreadable image: reported by name, the rest go on
    if not any(Path(raw).exists() for raw in args.paths):
        raise CaptionerError(f"no such image file or folder: {', '.join(args.paths)}")
    paths = [path for raw in args.paths for path in (list_images([raw]) if Path(raw).exists() else [Path(raw)])]
    if not paths:
        raise CaptionerError(f"no images found in {' '.join(args.paths)}")
    figures, used_names = None, set()
    if args.attention:
        options = replace(options, attention_layer=visualize.check_attention_layer(model, args.attention_layer))
        figures = check_writable_folder(args.attention, "the --attention folder")
        placement = visualize.cell_placement(model, cfg.data.image_size)
    records = [ImageRecord(image_id=str(p), path=p, captions=()) for p in paths]
    loader = evaluation_loader(records, cfg.data.image_size, args.batch_size)
    for batch, hyps in decode_batches(model, loader, device, options):
        for path, per_image in zip(batch.paths, hyps):
            entry = {"path": path, "captions": [{"caption": tokenizer.decode(h.tokens), "score": round(h.score, 4)}
                                                for h in per_image]}
            if figures is not None:  # the best caption's attention, drawn over the image as the user gave it
                figure = visualize.figure_path(figures, path, used_names)
                figure.write_bytes(visualize.attention_png(load_image(path), tokenizer, per_image[0], placement))
                entry["attention"] = str(figure)
            if args.json:
                print(json.dumps(entry), flush=True)
            else:  # a line per caption, best first (--num-captions N: N lines)
                print("\n".join(f"{path}\t{c['caption']}" for c in entry["captions"]), flush=True)
    failed = loader.dataset.failed_paths  # each was logged by name as it was skipped
    if failed:
        print(f"captioner caption: {len(failed)} of {len(paths)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def plot(args) -> int:
    from .curves import plot_curves, read_log

    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent)
    history = read_log(run)  # a missing log is named before any folder is made
    written = plot_curves(history, check_writable_folder(out, "the plots' folder"))
    print(json.dumps({"plots": [str(p) for p in written]}))
    return 0


def export(args) -> int:
    from .checkpoint import export_checkpoint

    print(json.dumps(export_checkpoint(args.checkpoint, args.out, fp16=args.fp16)))
    return 0


def make_synthetic(args) -> int:
    from .data.synthetic import make_synthetic as write

    check_writable_folder(args.out, "the dataset folder")
    paths = write(args.out, args.train, args.val, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in vars(paths).items()}, indent=2))
    return 0


def pack_images(args) -> int:
    from .pack import pack_images as pack

    summary = pack(args.source, args.destination, size=args.size, quality=args.quality, workers=args.workers,
                   square=args.square)
    if summary.unreadable:  # each was named on stderr as it was met
        print(f"captioner pack-images: {summary.unreadable} of {summary.images} image(s) could not be read and "
              "were not written", file=sys.stderr)
    print(json.dumps(summary.to_dict()))
    return 1 if summary.unreadable else 0


def bleu_bench(args) -> int:
    from .benchmarks.bleu_bench import run_from_args

    return run_from_args(args, split_records(args))


def benchmark(args) -> int:
    from .benchmarks import decode, train

    return {"decode": decode, "train": train}[args.benchmark].run_from_args(args)


def serve(args) -> int:
    from .serve import run_from_args

    return run_from_args(args)


def demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, args.device)
    return 0
