"""The root of fedtune's errors.

Every error fedtune raises on purpose derives from :class:`FedtuneError`; the ``fedtune``
command catches it once and prints its message as one line. User-facing errors keep a
built-in second base (``ValueError``, ``RuntimeError``) so that callers catching those still
work. :func:`unreadable` words an ``OSError`` or ``UnicodeDecodeError`` met while reading an
input file, for the error the reading code raises.
"""

from __future__ import annotations

from pathlib import Path


class FedtuneError(Exception):
    """An error fedtune raises on purpose: its message names the problem (and the file or
    key involved), for one line on the command line."""


def unreadable(path: str | Path, error: OSError | UnicodeDecodeError) -> str:
    """``PATH: what is wrong`` for an input file that could not be read as text."""
    if isinstance(error, UnicodeDecodeError):
        return f"{path}: not UTF-8 text (a binary file?)"
    if isinstance(error, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(error, IsADirectoryError):
        return f"{path}: is a folder, not a file"
    if isinstance(error, PermissionError):
        return f"{path}: permission denied"
    return f"{path}: cannot be read ({error.strerror or error})"


class AlreadyExistsError(FedtuneError, FileExistsError):
    """fedtune refuses to overwrite a file or folder that exists (nothing was written)."""


class MissingFileError(FedtuneError, FileNotFoundError):
    """A file fedtune needs (and made earlier) is not there."""
