"""Argument types for the package's command lines.

Each is an ``argparse`` ``type=``: a bad value becomes a usage line naming the option and exit
status 2, before anything runs or any file is written (the error contract of the functions,
carried to the command lines).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = [
    "dir_to_create",
    "existing_dir",
    "file_to_write",
    "float_in",
    "int_in",
]


def int_in(low: int, high: int | None = None):
    """An int in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float, *, low_open: bool = True):
    """A finite float in ``(low, high]`` (``[low, high]`` with ``low_open=False``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{low}, {high}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


def existing_dir(text: str) -> Path:
    """A directory that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return path


def dir_to_create(text: str) -> Path:
    """A directory that exists or can be created: no part of the path is a file."""
    path = Path(text)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} cannot be a directory: {str(part)!r} is a file")
    return path


def file_to_write(text: str) -> Path:
    """A file path whose directory exists (the file itself may exist; it is not a directory)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {str(path.parent)!r} does not exist")
    return path
