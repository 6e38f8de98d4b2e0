"""Key and secret files: created with their final mode from the start, and one error for any
key file or key text that cannot be used."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.common.errors import FedtuneError


class KeyFileError(FedtuneError, ValueError):
    """A key file or key text that cannot be used (unreadable, wrong format, wrong kind)."""


def write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never world-readable, even briefly); an
    existing file is never overwritten (``FileExistsError``)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # the umask may have narrowed ``mode``; make it exact
