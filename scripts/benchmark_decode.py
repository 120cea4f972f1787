"""Thin wrapper: `python scripts/benchmark_decode.py ARGS` is `captioner benchmark decode ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "decode", *sys.argv[1:]]))
