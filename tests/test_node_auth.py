"""A node's SuperNode authentication key: written in the formats Flower's own loaders read.

Flower's loaders are called only with good keys: on a bad one they call ``flwr_exit``, which
starts a thread that ends the whole process a few seconds later.
"""

from __future__ import annotations

import argparse
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedtune.common.keyfiles import KeyFileError
from fedtune.platform.security.node_auth import (
    NodeAuthKeyPaths,
    generate_node_auth_key,
    load_node_auth_public_key,
)


@pytest.fixture
def keys(tmp_path: Path) -> NodeAuthKeyPaths:
    return generate_node_auth_key(tmp_path / "state")


def _openssh_public(key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def test_key_files_have_openssh_formats_and_private_mode(keys: NodeAuthKeyPaths) -> None:
    assert keys.private_key.name == "auth_key" and keys.public_key.name == "auth_key.pub"
    assert keys.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 AAAA")
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_flower_supernode_loads_the_private_key(keys: NodeAuthKeyPaths) -> None:
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(
        auth_supernode_private_key=str(keys.private_key), auth_supernode_public_key=None
    )

    loaded = _try_setup_client_authentication(args)

    assert loaded is not None
    private_key, public_key = loaded
    assert isinstance(private_key.curve, ec.SECP384R1)
    assert _openssh_public(public_key) == keys.public_key.read_text().strip()


def test_flower_register_loads_the_public_key(keys: NodeAuthKeyPaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    registered = bytes_to_public_key(try_load_public_key(keys.public_key))

    assert _openssh_public(registered) == load_node_auth_public_key(keys.public_key)


def test_superlink_verifies_what_the_supernode_signs(keys: NodeAuthKeyPaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        sign_message,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(
        auth_supernode_private_key=str(keys.private_key), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    registered = bytes_to_public_key(try_load_public_key(keys.public_key))

    signature = sign_message(loaded[0], b"timestamp")

    assert verify_signature(registered, b"timestamp", signature)
    assert not verify_signature(registered, b"another timestamp", signature)


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "auth_key.pub").write_text("mine")

    with pytest.raises(FileExistsError, match=r"auth_key\.pub already exists"):
        generate_node_auth_key(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth_key.pub"]


def test_public_key_loads_from_a_path_a_path_string_or_its_text(keys: NodeAuthKeyPaths) -> None:
    line = keys.public_key.read_text().strip()

    assert load_node_auth_public_key(keys.public_key) == line
    assert load_node_auth_public_key(str(keys.public_key)) == line
    assert load_node_auth_public_key(f"  {line} hospital-a@gpu01\n") == line


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_public_key_made_by_ssh_keygen_is_accepted(tmp_path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "k")],
        check=True,
    )

    line = load_node_auth_public_key(tmp_path / "k.pub")

    assert line == " ".join((tmp_path / "k.pub").read_text().split()[:2])


def test_another_key_type_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "id_ed25519.pub"
    path.write_text(_openssh_public(ed25519.Ed25519PrivateKey.generate().public_key()))

    with pytest.raises(KeyFileError, match=re.escape(f"{path} holds a ssh-ed25519 key; ")):
        load_node_auth_public_key(path)


def test_rsa_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    text = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()

    with pytest.raises(KeyFileError, match="holds a ssh-rsa key"):
        load_node_auth_public_key(text)


def test_another_curve_is_refused() -> None:
    text = _openssh_public(ec.generate_private_key(ec.SECP256R1()).public_key())

    with pytest.raises(KeyFileError, match="ECDSA key on secp256r1"):
        load_node_auth_public_key(text)


def test_private_key_given_by_mistake_is_refused(keys: NodeAuthKeyPaths) -> None:
    with pytest.raises(KeyFileError, match=re.escape(f"{keys.private_key} is a private key")):
        load_node_auth_public_key(keys.private_key)


def test_pem_public_key_is_refused() -> None:
    pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )

    with pytest.raises(KeyFileError, match=r"is a PEM key; .*OpenSSH"):
        load_node_auth_public_key(pem)


@pytest.mark.parametrize(
    "text", ["not a key", "ecdsa-sha2-nistp384 AAAA", "ecdsa-sha2-nistp384 !!!"]
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(KeyFileError, match="is not an OpenSSH public key"):
        load_node_auth_public_key(text)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "auth_key.pub"
    path.write_text("\n")

    with pytest.raises(KeyFileError, match=re.escape(f"{path} is empty")):
        load_node_auth_public_key(path)
