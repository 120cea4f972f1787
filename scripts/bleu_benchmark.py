"""Thin wrapper: `python scripts/bleu_benchmark.py ARGS` is `captioner bleu-bench ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["bleu-bench", *sys.argv[1:]]))
