"""`captioner` command line: argparse subcommands, each a thin call into the library.

Exit status: 0 success; 1 some items failed (e.g. unreadable images while captioning); 2 a usage or input
error (bad flag, missing or malformed file), reported as one message without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import DataConfig
from .errors import CaptionerError, user_message
from .flag_types import at_least


def _add_dataset_flags(p: argparse.ArgumentParser, default_split: str | None) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=("coco", "flickr8k", "karpathy"), default="coco")
    g.add_argument("--captions", default="", help="coco: caption JSON of the split to score")
    g.add_argument("--images", default="", help="coco: image folder of that split")
    g.add_argument("--root", default="", help="flickr8k: folder holding Flickr8k_text/; karpathy: image root")
    g.add_argument("--karpathy-json", default="")
    g.add_argument("--split", default=default_split, choices=("train", "val", "dev", "test"),
                   help="flickr8k/karpathy split (default: %(default)s; coco files hold one split each)")
    g.add_argument("--limit", type=at_least(0), default=0, help="score only the first N images (0 = all)")


CHECKPOINTS_HELP = ("a checkpoint (RUN/best.pt or an exported file); repeated (--checkpoint A --checkpoint B), one "
                    "ensemble that averages their next-token probabilities (same vocabulary and image size)")


def _add_decoding_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    g.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha for ranking beams (0 = raw)")
    g.add_argument("--length-norm", choices=("gnmt", "average"), default="gnmt",
                   help="rank finished captions by GNMT penalty (with --length-penalty) or mean log-prob per token")
    g.add_argument("--max-len", type=at_least(1), default=30, help="maximum caption length in tokens")
    g.add_argument("--min-len", type=at_least(0), default=1, help="no end of caption before this many tokens")
    g.add_argument("--num-captions", type=at_least(1), default=1,
                   help="n-best captions per image (beam search needs --beam-size >= N; with --sample, N samples). "
                        "evaluate scores the best of them")
    g.add_argument("--no-repeat-ngram", type=int, default=0, help="never repeat an n-gram of this size (0 = off)")
    g.add_argument("--sample", action="store_true", help="sample instead of searching (with --beam-size 1)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed and batch size, same captions)")
    g.add_argument("--batch-size", type=at_least(1), default=32)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def build_parser() -> argparse.ArgumentParser:
    from .train_cli import add_train_arguments

    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_train_arguments(sub.add_parser("train", help="train a captioner"))
    add_train_arguments(sub.add_parser(
        "extract-features", help="cache the frozen trunk's features on disk for the run `train` would start "
        "with the same flags (train does this on its first epoch anyway)"))

    add_train_arguments(sub.add_parser(
        "pretrain-trunk", help="train the trunk alone to predict the training captions' content words and write "
        "OUT/trunk_pretrained.pt, a ResNet18 state dict for --encoder-weights (train --trunk-pretrain-epochs N "
        "does this first, inside the run)"))

    p = sub.add_parser("evaluate", help="decode a dataset split and score BLEU-1..4")
    p.add_argument("--checkpoint", required=True, action="append", help=CHECKPOINTS_HELP)
    _add_dataset_flags(p, default_split="test")
    _add_decoding_flags(p)
    p.add_argument("--out", default="", help="write the metrics JSON here")
    p.add_argument("--results", default="", help="write the COCO results file here")
    p.add_argument("--metrics", choices=("bleu", "all"), default="bleu",
                   help="all: add CIDEr-D, ROUGE-L and METEOR (pip install 'captioner[coco-eval]')")
    p.add_argument("--per-image", default="", help="write per-image captions, references and scores (JSON lines)")
    p.add_argument("--report", default="", help="write an HTML page of the best and worst captioned images")

    p = sub.add_parser("caption", help="caption image files or folders")
    p.add_argument("--checkpoint", required=True, action="append", help=CHECKPOINTS_HELP)
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    _add_decoding_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--attention", default="", metavar="OUT_DIR",
                   help="also write OUT_DIR/<image>.png: the image and, per word of the best caption, where the "
                        "decoder looked")
    p.add_argument("--attention-layer", type=int, default=-1,
                   help="Transformer decoder layer whose cross-attention (averaged over heads) is drawn (-1 = last)")

    p = sub.add_parser("plot", help="training curves of a run (loss, validation BLEU, learning rate) as PNGs")
    p.add_argument("run", metavar="RUN", help="run folder (or its log.jsonl)")
    p.add_argument("--out", default="", help="folder for the PNGs (default: the run folder)")

    p = sub.add_parser("export", help="write a checkpoint's model, config and tokenizer without its training state "
                       "(AdamW's two moments per trained weight; half that again with --fp16), for caption, "
                       "evaluate and serve")
    p.add_argument("checkpoint", help="a training checkpoint (RUN/best.pt)")
    p.add_argument("out", help="the file to write")
    p.add_argument("--fp16", action="store_true", help="store the weights as fp16 (loaded back as fp32)")

    p = sub.add_parser("make-synthetic", help="write a synthetic scenes dataset in COCO caption format")
    p.add_argument("out")
    p.add_argument("--train", type=at_least(1), default=2000, help="training images (default: %(default)s)")
    p.add_argument("--val", type=at_least(1), default=200, help="validation images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pack-images", help="copy a dataset folder with its images shrunk (same tree, same file "
                       "names; caption and split files copied as they are)")
    p.add_argument("source", metavar="SRC", help="dataset folder (e.g. the Flickr8k root, or a COCO folder)")
    p.add_argument("destination", metavar="DST", help="folder for the copy (created; not SRC or inside it)")
    p.add_argument("--size", type=int, default=DataConfig().image_size, help="shorter side of the packed images in "
                   "pixels; smaller images are kept at their size (default: %(default)s, the default --image-size "
                   "of train)")
    p.add_argument("--quality", type=int, default=85, help="JPEG/WebP quality (default: %(default)s)")
    p.add_argument("--square", action="store_true", help="stretch every image to exactly SIZE x SIZE, as training "
                   "resizes it, so loading does no resizing (for training at --image-size SIZE)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: os.cpu_count())")

    p = sub.add_parser("bleu-bench", help="checkpoints x beam sizes x length penalties on one split: tables, plot")
    from .benchmarks.bleu_bench import add_arguments as add_bleu_bench_arguments

    add_bleu_bench_arguments(p)
    _add_dataset_flags(p, default_split="test")

    p = sub.add_parser("benchmark", help="speed benchmarks that print JSON")
    kinds = p.add_subparsers(dest="benchmark", required=True, metavar="KIND")
    from .benchmarks.decode import add_arguments as add_decode_benchmark_arguments

    add_decode_benchmark_arguments(kinds.add_parser("decode", help="captions/s: batched, cached search vs naive"))
    from .benchmarks.train import add_arguments as add_train_benchmark_arguments

    add_train_benchmark_arguments(kinds.add_parser("train", help="training images/s: from JPEG, from cached features, "
                                                   "vs a plain fp32 baseline"))

    p = sub.add_parser("serve", help="web page and JSON API that caption uploaded images (loopback by default)")
    from .serve import add_arguments as add_serve_arguments

    add_serve_arguments(p)

    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> caption, on CPU in a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="auto")
    return parser


def _parser_of(unknown: list[str], argv: list[str], parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser whose part of `argv` holds the first of the `unknown` arguments: `captioner
    benchmark decode --bogus` -> that command's, `captioner --bogus train` -> the top level's."""
    first = argv.index(unknown[0]) if unknown[0] in argv else len(argv)
    at = 0
    while True:
        chosen = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        name = getattr(args, chosen[0].dest, None) if chosen else None
        if name is None or name not in argv[at:first]:
            return parser
        at = argv.index(name, at) + 1
        parser = chosen[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the command's own usage, not the top level's (which lists no flag of it)
        _parser_of(unknown, argv, parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from . import commands

    try:
        return getattr(commands, args.command.replace("-", "_"))(args) or 0
    except CaptionerError as exc:
        print(f"captioner {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"captioner {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
