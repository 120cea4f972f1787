"""Error types a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class CaptionerError(Exception):
    """Base class: the message names the file (or flag) and what is wrong with it.

    `exit_status` is what the command line exits with: 2 for a usage or input error (the default), 1 for a
    run that failed on its own (a non-finite loss, a checkpoint that cannot be written)."""

    exit_status = 2


class DatasetFormatError(CaptionerError, ValueError):
    """An annotation or split file is malformed: bad JSON, missing keys, wrong types."""


class ImageReadError(CaptionerError, OSError):
    """An image file is missing, empty, truncated, not an image, or too large to decode safely."""


class CheckpointError(CaptionerError):
    """A checkpoint file is missing, unreadable, unsafe, or from an incompatible version."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, read-only folder); the previous file is left intact."""

    exit_status = 1


class TrainingInterrupted(CaptionerError):
    """SIGINT/SIGTERM stopped training at a batch boundary, after last.pt was written."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


class WeightsUnavailableError(CaptionerError):
    """Encoder weights were requested but cannot be found or downloaded."""


class PackWriteError(CaptionerError):
    """pack-images could not write into its destination (full disk, read-only folder)."""

    exit_status = 1
