"""argparse types for numeric flags outside the run config (whose settings config.LIMITS checks): a value out
of range is a usage error naming the flag, at parse time, instead of a traceback or a silent slice later."""

from __future__ import annotations

import argparse
from typing import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An int flag's type that refuses values below `minimum`: `--batch-size 0` is "argument --batch-size: must
    be at least 1, got 0" (exit 2)."""

    def parse(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid int value: 'x'"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse
