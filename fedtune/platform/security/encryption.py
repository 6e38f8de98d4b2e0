"""Encryption at rest for the coordinator's global adapter checkpoints (AES-256-GCM).

The key is 32 random bytes, stored as one line of base64 in a file readable by its owner
only (mode 0600). An encrypted file is::

    b"FEDTUNE-AESGCM-1\\n" | 12-byte random nonce | ciphertext | 16-byte GCM tag

The associated data, authenticated but not stored, binds a file to its logical name (for
example ``b"RUN_ID/round-3/adapter_model.safetensors"``): a file moved to another name, a
wrong key or one changed byte all fail decryption with ``DecryptionError``. Each file gets a
fresh random nonce, so one key can safely encrypt up to about 2**32 files (NIST SP 800-38D,
section 8.3). Files are read whole into memory; ``cryptography`` allows up to 2 GiB.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune.common.errors import AlreadyExistsError, FedtuneError
from fedtune.common.keyfiles import KeyFileError, write_new_file

MAGIC = b"FEDTUNE-AESGCM-1\n"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class DecryptionError(FedtuneError, ValueError):
    """An encrypted file that cannot be decrypted: wrong key, modified, or not such a file."""


def generate_key_file(path: Path) -> Path:
    """Write a new random AES-256 key to ``path`` (base64, mode 0600); returns ``path``.

    Raises ``FileExistsError`` when ``path`` exists: a lost key makes every checkpoint
    encrypted with it unreadable, so a key file is never replaced.
    """
    path = Path(path)
    if path.exists():
        raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new_file(path, base64.b64encode(os.urandom(KEY_BYTES)) + b"\n", mode=0o600)
    return path


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path``.

    Raises ``KeyFileError`` when the file is missing or unreadable, is accessible by group
    or other users, or does not hold the base64 of exactly 32 bytes.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"no encryption key at {path}") from None
    except OSError as error:
        raise KeyFileError(f"cannot read encryption key {path}: {error.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(
            f"encryption key {path} is accessible by other users (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"encryption key {path} is not base64 text") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"encryption key {path} holds {len(key)} bytes; an AES-256 key is {KEY_BYTES}"
        )
    return key


def encrypt_file(src: Path, dst: Path, key: bytes, *, associated_data: bytes) -> None:
    """Encrypt ``src`` into ``dst`` (which may be ``src``), bound to ``associated_data``.

    ``dst`` is written atomically (it is either the whole encrypted file or untouched) with
    mode 0600.
    """
    _aead(key)  # a wrong key is refused before anything is read
    encrypt_bytes(Path(src).read_bytes(), Path(dst), key, associated_data=associated_data)


def encrypt_bytes(data: bytes, dst: Path, key: bytes, *, associated_data: bytes) -> None:
    """Encrypt ``data`` into ``dst`` as :func:`encrypt_file` does: plaintext never touches
    the disk."""
    aead = _aead(key)
    nonce = os.urandom(NONCE_BYTES)
    _replace_atomically(Path(dst), MAGIC + nonce + aead.encrypt(nonce, data, associated_data))


def decrypt_file(src: Path, key: bytes, *, associated_data: bytes) -> bytes:
    """The plaintext of ``src``, which ``encrypt_file`` wrote with ``associated_data``.

    Raises ``DecryptionError`` naming ``src`` when it is not an encrypted fedtune file, is
    truncated, or fails authentication (wrong key, a changed byte, or the file of another
    logical name).
    """
    aead = _aead(key)
    src = Path(src)
    blob = src.read_bytes()
    if not blob.startswith(MAGIC):
        raise DecryptionError(
            f"{src} is not an encrypted fedtune file (no {MAGIC.decode().strip()} header)"
        )
    if len(blob) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(f"{src} is truncated ({len(blob)} bytes)")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return aead.decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], associated_data)
    except InvalidTag:
        name = associated_data.decode("utf-8", errors="replace")
        raise DecryptionError(
            f"{src} cannot be decrypted as {name!r}: the key is wrong, the file was "
            "modified, or it is another file"
        ) from None


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise ValueError(f"an AES-256 key is {KEY_BYTES} bytes, got {size}")
    return AESGCM(key)


def _replace_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
