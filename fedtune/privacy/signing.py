"""A node's Ed25519 signing key, and public keys as auditors and the coordinator meet them.

A node's private key is an unencrypted PKCS#8 PEM file readable by its owner only (mode
0600); its public key travels as the base64 text of its 32 raw bytes (what a coordinator
enrolls and a ledger file's header names) or as a PEM file written next to the private key.
Signatures are Ed25519 (RFC 8032), carried as standard padded base64.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedtune.common.errors import MissingFileError
from fedtune.common.keyfiles import KeyFileError, write_new_file

_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


KEY_FILE = "node_key.pem"  # a node's (or the coordinator's) ledger key in its state folder


class NodeKey:
    """A node's Ed25519 private key: signs ledger entries and checkpoints."""

    def __init__(self, private_key: Ed25519PrivateKey):
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"NodeKey needs an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._private_key = private_key

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random key (held in memory only)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> NodeKey:
        """Read an unencrypted PKCS#8 PEM Ed25519 private key from ``path``."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingFileError(f"no node key at {path}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as error:
            raise KeyFileError(f"{path} is not an unencrypted PEM private key ({error})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """The key at ``path``, generated there first (mode 0600) if there is none.

        Also writes the public key as PEM to ``<path>.pub`` when that file is missing.
        """
        path = Path(path)
        if path.exists():
            key = cls.load(path)
        else:
            key = cls.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = key._private_key.private_bytes(
                encoding=serialization.Encoding.PEM,
                format=serialization.PrivateFormat.PKCS8,
                encryption_algorithm=serialization.NoEncryption(),
            )
            write_new_file(path, pem, mode=0o600)
        public_path = public_key_path(path)
        if not public_path.exists():
            write_new_file(public_path, public_key_pem(key.public_key), mode=0o644)
        return key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def public_key_text(self) -> str:
        """Base64 of the 32 raw public-key bytes."""
        return public_key_text(self.public_key)

    def sign(self, message: bytes) -> str:
        """Base64 (standard, padded) Ed25519 signature of ``message``."""
        return base64.b64encode(self._private_key.sign(message)).decode("ascii")

    def __repr__(self) -> str:
        return f"NodeKey(public_key={self.public_key_text()!r})"


def public_key_path(private_key_path: Path) -> Path:
    """Where ``NodeKey.load_or_create`` writes the public key: ``<path>.pub``."""
    private_key_path = Path(private_key_path)
    return private_key_path.with_name(private_key_path.name + ".pub")


def public_key_text(key: Ed25519PublicKey) -> str:
    """Base64 of the 32 raw bytes of ``key``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """``key`` as a SubjectPublicKeyInfo PEM block."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(value: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, a file holding its base64 text, or the text.

    Raises ``ValueError`` when ``value`` is none of these.
    """
    if isinstance(value, Path) or _is_file(value):
        path = Path(value)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise KeyFileError(f"cannot read public key file {path}: {error.strerror}") from None
        return _parse_public_key(data, source=str(path))
    return _parse_public_key(value.encode("utf-8", errors="replace"), source="the given text")


def public_key_from_text(text: str, *, source: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its text (base64 of the 32 bytes, or PEM), never from a file:
    for values read from data (an enrollment file, a ledger header), which must not name a
    path on this machine. ``source`` names where the text came from, for errors."""
    return _parse_public_key(text.encode("utf-8", errors="replace"), source=source, text_only=True)


def verify_signature(key: Ed25519PublicKey, *, signature: str, message: bytes) -> bool:
    """Whether ``signature`` (base64) is ``key``'s Ed25519 signature of ``message``."""
    raw = decode_signature(signature)
    if raw is None:
        return False
    try:
        key.verify(raw, message)
    except InvalidSignature:
        return False
    return True


def decode_signature(signature: str) -> bytes | None:
    """The 64 raw bytes of a base64 signature, or None when it is not one."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    return raw if len(raw) == _SIGNATURE_BYTES else None


def _parse_public_key(data: bytes, *, source: str, text_only: bool = False) -> Ed25519PublicKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in text.split(b"\n", 1)[0]:
            raise KeyFileError(
                f"{source} is a private key; give the public key (the .pub file or its base64)"
            )
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as error:
            raise KeyFileError(f"{source} is not a valid PEM public key ({error})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{source} holds a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _PUBLIC_KEY_BYTES:
        if text_only:
            raise KeyFileError(
                f"{source} is not an Ed25519 public key (the base64 text of its "
                f"{_PUBLIC_KEY_BYTES} bytes, or PEM)"
            )
        shown = source if source != "the given text" else repr(data.decode(errors="replace")[:60])
        raise KeyFileError(
            f"{shown} is neither a public-key file (PEM or base64) nor the base64 text of a "
            f"{_PUBLIC_KEY_BYTES}-byte Ed25519 public key"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False
