"""The key pair a node uses to authenticate to the coordinator's Flower SuperLink.

Flower 1.41 authenticates a SuperNode by an ECDSA key whose public half the coordinator admin
has registered (``flwr supernode register auth_key.pub``); the SuperNode is started with
``--auth-supernode-private-key auth_key``. The formats are those of
``ssh-keygen -t ecdsa -b 384``, because Flower reads them with ``cryptography``'s OpenSSH
loaders:

- ``auth_key``: the private key, unencrypted OpenSSH format
  (``-----BEGIN OPENSSH PRIVATE KEY-----``), mode 0600; the SuperNode reads it with
  ``load_ssh_private_key`` and refuses anything but an EC key.
- ``auth_key.pub``: one line ``ecdsa-sha2-nistp384 AAAA...``; ``flwr supernode register``
  reads it with ``load_ssh_public_key`` and accepts only NIST curves. We use P-384.

Decision: this key is separate from the node's ledger signing key. The ledger signs entries
with Ed25519 (``fedtune.privacy.signing.NodeKey``, ``node_key.pem`` in the node's state
directory), while Flower requires an ECDSA NIST-curve key for SuperNode authentication, so
one key cannot serve both. Keeping them apart also keeps their lives apart: the auth key can
be revoked and replaced at the SuperLink without breaking the ledger's signature chain, which
auditors verify against the Ed25519 key. ``fedtune node keygen`` creates both in one
directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.common.errors import AlreadyExistsError
from fedtune.common.keyfiles import KeyFileError, write_new_file

AUTH_KEY_FILE = "auth_key"
AUTH_PUBLIC_KEY_FILE = "auth_key.pub"
KEY_TYPE = "ecdsa-sha2-nistp384"
_SSH_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-")


@dataclass(frozen=True)
class NodeAuthKeyPaths:
    """Where a node's SuperNode authentication key pair is."""

    private_key: Path
    public_key: Path


def generate_node_auth_key(out_dir: Path) -> NodeAuthKeyPaths:
    """Write a new ECDSA P-384 key pair as ``out_dir/auth_key`` (0600) and ``auth_key.pub``.

    Raises ``FileExistsError`` naming the file when either exists; nothing is written then.
    """
    out_dir = Path(out_dir)
    paths = NodeAuthKeyPaths(
        private_key=out_dir / AUTH_KEY_FILE, public_key=out_dir / AUTH_PUBLIC_KEY_FILE
    )
    for path in (paths.private_key, paths.public_key):
        if path.exists():
            raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_new_file(paths.private_key, private, mode=0o600)
    write_new_file(paths.public_key, public + b"\n", mode=0o644)
    return paths


def load_node_auth_public_key(path_or_text: str | Path) -> str:
    """The ``ecdsa-sha2-nistp384 AAAA...`` line of a node's public key file or text.

    ``path_or_text`` is a ``Path``, the path of an existing file, or the key's text itself. A
    trailing comment is dropped. Raises ``KeyFileError`` saying what is wrong for a private
    key, a PEM key, another key type or curve, or anything that is not an OpenSSH public key.
    """
    if isinstance(path_or_text, Path) or _is_file(path_or_text):
        path = Path(path_or_text)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise KeyFileError(f"cannot read public key file {path}: {error.strerror}") from None
        source = str(path)
    else:
        data = path_or_text.encode("utf-8", errors="replace")
        source = repr(path_or_text[:60])
    return _parse(data.strip(), source=source)


def node_auth_public_key_from_text(text: str, *, source: str) -> str:
    """:func:`load_node_auth_public_key` of the key's text only, never a file: for values read
    from data (an enrollment file), which must not name a path on this machine."""
    return _parse(text.encode("utf-8", errors="replace").strip(), source=source)


def _parse(text: bytes, *, source: str) -> str:
    wanted = (
        f"SuperNode authentication needs an OpenSSH {KEY_TYPE} public key (the "
        f"{AUTH_PUBLIC_KEY_FILE} that `fedtune node keygen` or `ssh-keygen -t ecdsa -b 384` "
        "writes)"
    )
    if not text:
        raise KeyFileError(f"{source} is empty; {wanted}")
    if text.startswith(b"-----BEGIN") and b"PRIVATE KEY" in text.split(b"\n", 1)[0]:
        raise KeyFileError(
            f"{source} is a private key; give the public key ({AUTH_PUBLIC_KEY_FILE}) instead"
        )
    if text.startswith(b"-----BEGIN"):
        raise KeyFileError(f"{source} is a PEM key; {wanted}")
    key_type = text.split(maxsplit=1)[0].decode("ascii", errors="replace")
    try:
        key = serialization.load_ssh_public_key(text)
    except (UnsupportedAlgorithm, ValueError):
        if key_type.startswith(_SSH_KEY_TYPE_PREFIXES) and key_type != KEY_TYPE:
            raise KeyFileError(f"{source} holds a {key_type} key; {wanted}") from None
        raise KeyFileError(f"{source} is not an OpenSSH public key; {wanted}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(f"{source} holds a {key_type} key; {wanted}")
    if not isinstance(key.curve, ec.SECP384R1):
        raise KeyFileError(f"{source} holds an ECDSA key on {key.curve.name}; {wanted}")
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False
