"""Thin wrapper: `python scripts/benchmark_train.py ARGS` is `captioner benchmark train ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "train", *sys.argv[1:]]))
