"""Building and loading the flat strategy's kernel (``_vm.cpp``).

The kernel is compiled on first use with torch's C++ extension tooling, for this machine, and
cached by torch under ``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), so
later processes load it at once. Where it cannot be built (no compiler, no ninja) polyak warns
once and runs the other strategies. ``POLYAK_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

_SOURCE = Path(__file__).with_name("_vm.cpp")
# fp-contract off: every rounding is the one written, so results match torch's kernels.
# no-math-errno: lets sqrt and fma vectorize; it changes no value.
FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-ffp-contract=off",
    "-fno-math-errno",
]
# fopenmp: at::parallel_for is a header template over OpenMP; without it, it runs serially.
_FLAGS = [*FLAGS, "-fopenmp"]
_lock = threading.Lock()
_module: Any = None
_failed = False


def load() -> Any:
    """The compiled kernel module, or None where it cannot be had."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("POLYAK_NATIVE", "1") == "0":
            _failed = True
            return None
        try:
            from torch.utils import cpp_extension

            digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[
                :12
            ]
            _module = cpp_extension.load(
                name=f"polyak_vm_{digest}",
                sources=[str(_SOURCE)],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # any build failure means: run without the kernel
            _failed = True
            warnings.warn(
                "polyak: the flat kernel could not be built, so steps run polyak's foreach "
                f"and loop strategies instead ({type(error).__name__}: {error}). Installing "
                "a C++ compiler and the 'ninja' package enables it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module
