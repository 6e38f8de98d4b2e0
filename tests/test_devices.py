"""Which precision a device computes natively: what the demo's ``--dtype auto`` rests on."""

from __future__ import annotations

import pytest
import torch

from fedtune.platform.model import devices

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Intel Cooper Lake
        ("fpu sse2 avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
        ("fpu sse2 avx2 avx512f avx512_vnni", False),  # AVX-512 alone emulates bfloat16
        ("fpu sse2 avx2 not_avx512_bf16x", False),  # a flag is a whole word
    ],
)
def test_a_cpu_computes_bfloat16_natively_only_with_its_instructions(
    tmp_path, monkeypatch, flags, native
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {n}\nflags\t\t: {flags}\n\n" for n in (0, 1)))
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)

    assert devices.native_bfloat16(CPU) is native


def test_without_cpuinfo_the_cpu_is_taken_for_one_that_emulates_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "absent")

    assert devices.native_bfloat16(CPU) is False
