"""How torch's CPU kernels round in this process, found by asking them.

torch compiles its elementwise kernels once per CPU capability (``DEFAULT``, ``AVX2``,
``AVX512`` on x86; others on ARM) and picks one when it starts, by the CPU and by
``ATEN_CPU_CAPABILITY``. The capabilities give different bits for the same operation:

- **fused multiply-add**: where the kernel is built for a CPU with FMA, ``a.add_(b, alpha=s)``,
  ``addcmul_`` and ``lerp_`` round once (``fma(b, s, a)``); the ``DEFAULT`` kernels round the
  product and the sum apart.
- **maximum on NaN**: the vectorised body of torch's ``maximum`` writes NaN as all ones on x86
  vectors, or passes the NaN operand through where the vector code is generic; the scalar tail
  of each chunk writes the canonical NaN.
- **where the body ends**: the tail is the last ``numel % width`` elements of each chunk, the
  width being that of the body's step, which differs between capabilities and dtypes.

Rather than a table of what each capability did in one torch release, polyak runs each of
these operations once per process and dtype on a few hundred elements chosen to tell the
answers apart (well under a millisecond), and the flat kernel follows what it finds. Where the
answers fit none of the forms the kernel knows, it declines, and steps run torch's own
operations.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

#: What the vector body of torch's ``maximum`` writes where an operand is NaN.
MAX_NAN_ONES = 0  # all ones (x86 vectors: a comparison mask or-ed in)
MAX_NAN_KEEP = 1  # the NaN operand itself, the first one's where both are (generic vectors)
#: A body step so wide that every element lies in the scalar tail.
NO_BODY = 1 << 40


@dataclass(frozen=True)
class Rounding:
    """How torch's kernels round one dtype in this process.

    Attributes:
        capability: ``torch.backends.cpu.get_cpu_capability()``.
        fma: whether ``add_`` with ``alpha``, ``addcmul_`` and ``lerp_`` round once.
        max_nan: ``MAX_NAN_ONES`` or ``MAX_NAN_KEEP``.
        width: elements per step of ``maximum``'s vector body (``NO_BODY``: it has none).
    """

    capability: str
    fma: bool
    max_nan: int
    width: int


def capability() -> str:
    """The capability torch's CPU kernels run at in this process."""
    return str(torch.backends.cpu.get_cpu_capability())


def mkl_path() -> str:
    """What selects MKL's code path besides the CPU (its sqrt's bits may depend on it)."""
    return "|".join(
        f"{name}={os.environ.get(name, '')}"
        for name in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE")
    )


def rounding(dtype: torch.dtype) -> Rounding | str:
    """How torch's kernels round ``dtype`` (float32 for the half types, whose flat steps compute
    in float32), or why it could not be told."""
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return _rounding(capability(), dtype)


@functools.cache
def _rounding(cap: str, dtype: torch.dtype) -> Rounding | str:
    if dtype not in (torch.float32, torch.float64):
        return f"no flat kernel for {dtype}"
    try:
        with torch.no_grad(), _one_thread():
            fma = _fma(dtype)
            if isinstance(fma, str):
                return fma
            found = _maximum(dtype)
    except Exception as error:  # a build of torch whose kernels answer otherwise
        return f"torch's {cap} kernels could not be asked how they round ({error})"
    if isinstance(found, str):
        return found
    return Rounding(cap, fma, *found)


class _one_thread:
    """torch on one thread: the probes' tensors are below its grain anyway; this keeps them so
    whatever the grain."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.threads != 1:
            torch.set_num_threads(self.threads)


_N = 1000


def _fma(dtype: torch.dtype) -> bool | str:
    """Whether torch's ``add_``, ``addcmul_`` and ``lerp_`` round once; a reason where they
    disagree, or match neither form."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(_N, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    c = (torch.rand(_N, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    s = torch.tensor(0.3141, dtype=dtype)
    w_small, w_large = torch.tensor(0.1, dtype=dtype), torch.tensor(0.9, dtype=dtype)
    # (torch's result, the result rounded apart, the exact product's terms for the fused form)
    cases = [
        (a.clone().add_(b, alpha=s.item()), a + b * s, (b, s, a)),
        (a.clone().addcmul_(b, c, value=s.item()), a + (b * s) * c, (b * s, c, a)),
        (a.clone().lerp_(b, w_small.item()), a + w_small * (b - a), (w_small, b - a, a)),
        (a.clone().lerp_(b, w_large.item()), b + (w_large - 1) * (b - a), (w_large - 1, b - a, b)),
    ]
    verdicts = set()
    for got, apart, (x, y, z) in cases:
        if torch.equal(got, apart):
            verdicts.add(False)
            continue
        if dtype == torch.float32:
            # The float64 product of two floats is exact; its sum rounds twice at worst, which
            # a few random elements in a thousand could show.
            fused = (x.double() * y.double() + z.double()).float()
            if int((fused != got).sum()) > 2:
                return f"torch's {capability()} kernels round multiply-adds in an unknown way"
        verdicts.add(True)
    if len(verdicts) != 1:
        return f"torch's {capability()} kernels fuse some multiply-adds and not others"
    return verdicts.pop()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _nan(dtype: torch.dtype, payload: int) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.tensor([0x7FC00000 | payload], dtype=torch.int32).view(dtype)
    return torch.tensor([0x7FF8000000000000 | payload], dtype=torch.int64).view(dtype)


def _maximum(dtype: torch.dtype) -> tuple[int, int] | str:
    """What ``maximum``'s vector body writes for NaN, and its step's width."""
    n = 255  # one less than a power of two: the tail is one less than the width
    payload, other = _nan(dtype, 0x123), _nan(dtype, 0x456)
    canonical = _bits(_nan(dtype, 0))[0]
    got = _bits(torch.maximum(payload.expand(n).clone(), torch.zeros(n, dtype=dtype)))
    tail = got == canonical
    body = int((~tail).sum())
    unknown = f"torch's {capability()} maximum writes NaN in an unknown way"
    if not bool(tail[body:].all()):
        return unknown
    if not _zeros_split_at(dtype, n, body):
        return unknown
    if body == 0:
        return MAX_NAN_ONES, NO_BODY
    width = n - body + 1
    if width & (width - 1) or body % width:
        return unknown
    if bool((got[:body] == -1).all()):
        mode = MAX_NAN_ONES
    elif bool((got[:body] == _bits(payload)[0]).all()):
        mode = MAX_NAN_KEEP
        # The NaN of the second operand, where the first is a number, passes through too; the
        # first one's where both are NaN.
        second = torch.maximum(torch.zeros(n, dtype=dtype), other.expand(n).clone())
        both = torch.maximum(payload.expand(n).clone(), other.expand(n).clone())
        if not (
            bool((_bits(second)[:body] == _bits(other)[0]).all())
            and bool((_bits(both)[:body] == _bits(payload)[0]).all())
        ):
            return unknown
    else:
        return unknown
    return mode, width


def _zeros_split_at(dtype: torch.dtype, n: int, body: int) -> bool:
    """Whether of two equal numbers (+0 and -0, either way round) maximum's body keeps the
    second and its tail the first, the body being the first ``body`` elements."""
    plus, minus = torch.zeros(n, dtype=dtype), torch.full((n,), -0.0, dtype=dtype)
    for first, second in ((plus, minus), (minus, plus)):
        signs = torch.signbit(torch.maximum(first, second))
        expected = torch.cat([torch.signbit(second[:body]), torch.signbit(first[body:])])
        if not torch.equal(signs, expected):
            return False
    return True


def fused_width(dtype: torch.dtype) -> int | str:
    """Elements per step of the vector body of torch's fused CPU kernels (``fused=True``) for
    ``dtype``: the scalar tail is the last ``numel % width`` elements of each tensor. A reason
    where it cannot be told, or their tail rounds in a way the kernel does not know."""
    return _fused_width(capability(), dtype)


@functools.cache
def _fused_width(cap: str, dtype: torch.dtype) -> int | str:
    try:
        with torch.no_grad(), _one_thread():
            return _fused_adam_width(dtype)
    except Exception as error:  # a build of torch without these kernels, or other ones
        return f"torch's {cap} fused kernels could not be asked how they round ({error})"


def _fused_adam_width(dtype: torch.dtype) -> int | str:
    """One AMSGrad step of torch's fused Adam on NaN gradients: its vector body's maximum
    writes NaN, its scalar tail's ``std::max`` keeps the old maximum (1). And one on numbers,
    whose tail must round ``v * beta2 + (1 - beta2) * g * g`` as ``fma(v, beta2, ...)`` where
    torch's kernels fuse (else both products apart), as ``_program.fused_form`` has it."""
    n = 127  # one less than a power of two: the tail is one less than the width
    zeros = [torch.zeros(n, dtype=dtype) for _ in range(3)]
    maxima = torch.ones(n, dtype=dtype)
    torch._fused_adam_(
        [zeros[0]], [torch.full((n,), float("nan"), dtype=dtype)], [zeros[1]], [zeros[2]],
        [maxima], [torch.ones((), dtype=torch.float32)], lr=0.1, beta1=0.9, beta2=0.99,
        weight_decay=0.0, eps=1e-8, amsgrad=True, maximize=False,
    )  # fmt: skip
    kept = maxima == 1
    body = int((~kept).sum())
    unknown = f"torch's {capability()} fused kernels split their body and tail in an unknown way"
    if not bool(kept[body:].all()) or not bool(maxima[:body].isnan().all()):
        return unknown
    width = n - body + 1
    if width & (width - 1) or width > n:
        return unknown
    # The tail's rounding, on one tail's worth of numbers (the whole tensor is tail).
    found = rounding(dtype)
    if isinstance(found, str):
        return found
    gen = torch.Generator().manual_seed(0)
    m = width - 1
    g, v = (torch.randn(m, generator=gen, dtype=torch.float64) for _ in range(2))
    g, v = g.to(dtype), (v * v).to(dtype)
    out = v.clone()
    torch._fused_adam_(
        [torch.zeros(m, dtype=dtype)], [g.clone()], [torch.zeros(m, dtype=dtype)], [out], [],
        [torch.ones((), dtype=torch.float32)], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0,
        eps=1e-8, amsgrad=False, maximize=False,
    )  # fmt: skip
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    beta2, coefficient = torch.tensor(0.99, dtype=compute), torch.tensor(1 - 0.99, dtype=compute)
    g, v = g.to(compute), v.to(compute)
    added = (coefficient * g) * g
    if found.fma and compute == torch.float32:
        # The float64 product of two floats is exact; its sum rounds twice at worst.
        expected = (v.double() * beta2.double() + added.double()).float()
        if int((expected.to(dtype) != out).sum()) > 1:
            return unknown.replace("split their body and tail", "round their tail")
    elif not found.fma and not torch.equal((v * beta2 + added).to(dtype), out):
        return unknown.replace("split their body and tail", "round their tail")
    return width


def describe(dtype: torch.dtype = torch.float32) -> str:
    """How torch's kernels round ``dtype`` here, in words, as the flat kernel follows it."""
    found = rounding(dtype)
    if isinstance(found, str):
        return f"torch's {capability()} kernels; not followed: {found}"
    fused = "multiply-adds fused" if found.fma else "multiply-adds rounded twice"
    nan = "all ones" if found.max_nan == MAX_NAN_ONES else "the NaN operand"
    body = (
        "no vector body"
        if found.width == NO_BODY
        else f"NaN as {nan} in a body of {found.width} elements"
    )
    return f"as torch's {found.capability} kernels round: {fused}, maximum with {body}"
