"""The kernel and the generated programs build for ARM (AArch64) as they do for x86.

Cross-compiled with Debian's ``aarch64-linux-gnu-g++`` (``.ci/run`` installs it; skipped where
it is absent). This proves the code is portable and takes NEON's whole vectors; it does not
prove torch's numbers on an ARM CPU, which needs one to run on (the README's support matrix
says so).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import polyak
from polyak.strategies.flat import _codegen, _kernel, _toolchain, _trace

CROSS = "aarch64-linux-gnu-g++"
needs_cross = pytest.mark.skipif(
    shutil.which(CROSS) is None,
    reason=f"no {CROSS} (Debian's g++-aarch64-linux-gnu; .ci/run installs it)",
)
#: The flags programs are built with, for a generic AArch64 CPU instead of this one.
ARM_FLAGS = [
    "-O3",
    "-march=armv8-a",
    *(f for f in _toolchain.PROGRAM_FLAGS if not f.startswith(("-march", "-mprefer", "-O"))),
]


def _adam_vcode() -> tuple[list[tuple[int, ...]], list[int]]:
    opt = polyak.Adam([torch.zeros(3, requires_grad=True)], amsgrad=True)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    program = _trace.trace(polyak.Adam.update, hyper, keys, ["step"])
    return [tuple(int(x) for x in row) for row in program.vcode.tolist()], list(program.stored)


def _assembly(source: str, tmp_path: Path) -> str:
    src, out = tmp_path / "program.cpp", tmp_path / "program.s"
    src.write_text(source)
    flags = [f for f in ARM_FLAGS if f != "-shared"]
    done = subprocess.run(
        [CROSS, *flags, "-S", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # And it links, as the shared library the kernel loads.
    lib = tmp_path / "program.so"
    done = subprocess.run(
        [CROSS, *ARM_FLAGS, "-o", str(lib), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


@needs_cross
@pytest.mark.parametrize("fma", [True, False], ids=["fused", "unfused"])
def test_a_float32_program_builds_for_arm_on_whole_neon_vectors(fma: bool, tmp_path: Path) -> None:
    vcode, stored = _adam_vcode()
    source = _codegen.generate(vcode, 5, stored, torch.float32, _codegen.SQRT_EXACT, fma=fma)
    asm = _assembly(source, tmp_path)
    assert "fsqrt\tv" in asm and "fdiv\tv" in asm  # four lanes at a time
    # Multiply-adds fused where torch's kernels fuse them, and only there.
    assert ("fmla\tv" in asm) == fma


@needs_cross
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_programs_of_other_dtypes_build_for_arm(dtype: torch.dtype, tmp_path: Path) -> None:
    vcode, stored = _adam_vcode()
    source = _codegen.generate(vcode, 5, stored, dtype, _codegen.SQRT_EXACT)
    asm = _assembly(source, tmp_path)
    assert "fsqrt\t" in asm


@pytest.mark.slow
@needs_cross
def test_the_kernel_builds_for_arm(tmp_path: Path) -> None:
    """``kernel/kernel.cpp``, against this torch's headers: it names no x86 instruction."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    flags = [f for f in _toolchain.KERNEL_FLAGS if not f.startswith(("-march", "-mprefer"))]
    source, target = str(_kernel._SOURCE), str(tmp_path / "kernel.o")
    command = [CROSS, "-std=c++20", "-march=armv8-a", *flags, "-fPIC", *includes, "-w"]
    command += ["-DTORCH_EXTENSION_NAME=polyak_kernel", "-c", source, "-o", target]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = (tmp_path / "kernel.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # AArch64
