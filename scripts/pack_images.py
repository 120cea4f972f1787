"""Thin wrapper: `python scripts/pack_images.py ARGS` is `captioner pack-images ARGS`."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack-images", *sys.argv[1:]]))
