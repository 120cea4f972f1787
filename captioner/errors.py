"""Error types a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class CaptionerError(Exception):
    """Base class: the message names the file (or flag) and what is wrong with it."""


class DatasetFormatError(CaptionerError, ValueError):
    """An annotation or split file is malformed: bad JSON, missing keys, wrong types."""


class ImageReadError(CaptionerError, OSError):
    """An image file is missing, empty, truncated, not an image, or too large to decode safely."""


class CheckpointError(CaptionerError):
    """A checkpoint file is missing, unreadable, unsafe, or from an incompatible version."""


class WeightsUnavailableError(CaptionerError):
    """Encoder weights were requested but cannot be found or downloaded."""
