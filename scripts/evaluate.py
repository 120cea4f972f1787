"""Thin wrapper: `python scripts/evaluate.py ARGS` is `captioner evaluate ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
