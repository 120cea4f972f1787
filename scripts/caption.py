"""Thin wrapper: `python scripts/caption.py ARGS` is `captioner caption ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
