"""Error types a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class CaptionerError(Exception):
    """Base class: the message names the file (or flag) and what is wrong with it.

    `exit_status` is what the command line exits with: 2 for a usage or input error (the default), 1 for a
    run that failed on its own (a non-finite loss, a checkpoint that cannot be written)."""

    exit_status = 2


def user_message(exc: CaptionerError) -> str:
    """The message to print for `exc`. One raised in a DataLoader worker reaches the main process re-created by
    torch with the worker's traceback as its message ("Caught ImageReadError in DataLoader worker process 0.
    Original Traceback ... captioner.errors.ImageReadError: cannot read image ..."): its own message is what
    follows the error's name on the traceback's last line."""
    message = str(exc)
    if "\nOriginal Traceback" not in message:
        return message
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = message.rfind(name)
    return message[at + len(name):].strip() if at >= 0 else message


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
