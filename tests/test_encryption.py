"""Checkpoints encrypted at rest with AES-256-GCM, bound to their logical names."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from fedtune.common.keyfiles import KeyFileError
from fedtune.platform.security.encryption import (
    MAGIC,
    DecryptionError,
    decrypt_file,
    encrypt_file,
    generate_key_file,
    load_key,
)

NAME = b"run-1/round-3/adapter_model.safetensors"


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return load_key(generate_key_file(tmp_path / "keys" / "checkpoint.key"))


@pytest.fixture
def encrypted(tmp_path: Path, key: bytes) -> Path:
    plain = tmp_path / "adapter_model.safetensors"
    plain.write_bytes(os.urandom(100_000))
    out = tmp_path / "adapter_model.safetensors.enc"
    encrypt_file(plain, out, key, associated_data=NAME)
    return out


def test_round_trip_returns_the_original_bytes(tmp_path: Path, key: bytes) -> None:
    plain = tmp_path / "adapter.bin"
    plain.write_bytes(os.urandom(3_000_000))
    out = tmp_path / "adapter.bin.enc"

    encrypt_file(plain, out, key, associated_data=NAME)

    blob = out.read_bytes()
    assert blob.startswith(MAGIC)
    assert len(blob) == len(MAGIC) + 12 + 3_000_000 + 16
    assert plain.read_bytes() not in blob
    assert decrypt_file(out, key, associated_data=NAME) == plain.read_bytes()


def test_file_can_be_encrypted_in_place(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"weights")

    encrypt_file(path, path, key, associated_data=NAME)

    assert decrypt_file(path, key, associated_data=NAME) == b"weights"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_same_file_encrypts_differently_each_time(tmp_path: Path, key: bytes) -> None:
    plain = tmp_path / "adapter.bin"
    plain.write_bytes(b"weights")

    encrypt_file(plain, tmp_path / "a", key, associated_data=NAME)
    encrypt_file(plain, tmp_path / "b", key, associated_data=NAME)

    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


def test_wrong_key_fails_clearly(encrypted: Path) -> None:
    with pytest.raises(
        DecryptionError, match=re.escape(f"{encrypted} cannot be decrypted as 'run-1/")
    ):
        decrypt_file(encrypted, os.urandom(32), associated_data=NAME)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_tampered_byte_fails_clearly(encrypted: Path, key: bytes, where: str) -> None:
    blob = bytearray(encrypted.read_bytes())
    offset = {"nonce": len(MAGIC), "ciphertext": len(blob) // 2, "tag": len(blob) - 1}[where]
    blob[offset] ^= 0x01
    encrypted.write_bytes(bytes(blob))

    with pytest.raises(DecryptionError, match="the file was modified"):
        decrypt_file(encrypted, key, associated_data=NAME)


def test_file_swapped_for_another_round_fails(encrypted: Path, key: bytes) -> None:
    with pytest.raises(DecryptionError, match="cannot be decrypted as 'run-1/round-4/"):
        decrypt_file(encrypted, key, associated_data=b"run-1/round-4/adapter_model.safetensors")


def test_plain_file_is_not_taken_for_an_encrypted_one(tmp_path: Path, key: bytes) -> None:
    plain = tmp_path / "adapter_model.safetensors"
    plain.write_bytes(b"\x08\x00\x00\x00")

    with pytest.raises(
        DecryptionError, match=re.escape(f"{plain} is not an encrypted fedtune file")
    ):
        decrypt_file(plain, key, associated_data=NAME)


def test_truncated_file_fails_clearly(encrypted: Path, key: bytes) -> None:
    encrypted.write_bytes(encrypted.read_bytes()[: len(MAGIC) + 20])

    with pytest.raises(DecryptionError, match="is truncated"):
        decrypt_file(encrypted, key, associated_data=NAME)


def test_key_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="an AES-256 key is 32 bytes, got 16"):
        encrypt_file(tmp_path / "x", tmp_path / "y", os.urandom(16), associated_data=NAME)


def test_key_file_is_owner_only_base64_of_32_bytes(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "checkpoint.key")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "checkpoint.key")
    before = path.read_bytes()

    with pytest.raises(FileExistsError, match=r"checkpoint\.key already exists"):
        generate_key_file(path)

    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_key_file_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = generate_key_file(tmp_path / "checkpoint.key")
    os.chmod(path, mode)

    with pytest.raises(KeyFileError, match=re.escape(f"(mode {mode:04o}); run: chmod 600 {path}")):
        load_key(path)


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        KeyFileError, match=re.escape(f"no encryption key at {tmp_path / 'none.key'}")
    ):
        load_key(tmp_path / "none.key")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not base64!\n", "is not base64 text"),
        (base64.b64encode(bytes(range(16))) + b"\n", "holds 16 bytes; an AES-256 key is 32"),
        (b"", "holds 0 bytes"),
    ],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "checkpoint.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)

    with pytest.raises(KeyFileError, match=problem):
        load_key(path)
