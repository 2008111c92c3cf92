"""State stored in another dtype than its parameters, on the flat path: float32, bfloat16 and
float16 parameters with each parameter-shaped state key in float32, bfloat16 or float16.

The defined numbers, at every step: ``s = state.float(); <the float32 update, on s>;
state.copy_(s)``. They are checked bit for bit against a twin optimizer (torch's, stepping
float32 parameters with float32 state) whose state is rounded through each key's dtype after
every step, and whose parameters are rounded through theirs. NaNs are compared as NaNs: the
kernel stores a NaN as c10's scalar conversion does (bfloat16 0x7fc0), where torch's
vectorised copy writes another NaN.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch
from conftest import clone_kwargs, has_tensor
from registry import REGISTRY, Entry, ids

import polyak
from polyak.strategies import flat
from polyak.strategies.flat import _codegen, _compiled, _kernel, _plan, _toolchain, _trace

vm = _kernel.load(wait=True)
needs_kernel = pytest.mark.skipif(vm is None, reason="the flat kernel is unavailable")
needs_compiler = pytest.mark.skipif(
    vm is None or _toolchain.compiler() is None or not _compiled.compiles(),
    reason="the flat kernel or a C++ compiler is unavailable",
)

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
#: Sizes off every vector width, several blocks, a tensor without elements, and one that two
#: threads split in two chunks (each with its own tail, where AMSGrad's maximum differs).
SHAPES = [(3, 4), (5,), (300,), (1000,), (0,), (67, 3), (70_001,)]
#: For half-precision parameters, whose twin steps float32 ones: sizes whose last 1 to 3
#: elements are the scalar tail of torch's fused kernels in both dtypes (their vector body is
#: twice as wide in the half types).
HALF_SHAPES = [(1,), (3,), (33,), (3, 11), (0,), (1025,), (2081,)]
MODES = ["compiled", "interpreted"]

#: ``POLYAK_TRIALS=exhaustive`` runs every case at 1 and 2 threads, compiled and interpreted;
#: otherwise each case runs one of the four, in turn, so that each runs over the cases.
EXHAUSTIVE = os.environ.get("POLYAK_TRIALS", "").strip().lower() == "exhaustive"
_RUNS = [(threads, mode) for mode in MODES for threads in (1, 2)]


def _cases(fused: bool, kinds: tuple[Any, ...] = (None,)) -> list[Any]:
    """(entry, config, index, kind, threads, mode) for each configuration of each flat entry,
    each ``kind`` (a parameter dtype, where the test takes one), and the runs it makes."""
    cases = [
        (entry, config, i, kind)
        for entry in REGISTRY
        if entry.flat and not entry.sparse_grads and (entry.fused or not fused)
        for i, config in enumerate(entry.configs)
        if fused or not has_tensor(config)
        for kind in kinds
    ]
    params = []
    for n, (entry, config, i, kind) in enumerate(cases):
        runs = _RUNS if EXHAUSTIVE else [_RUNS[n % len(_RUNS)]]
        for threads, mode in runs:
            name = f"{ids(entry)}-{i}{'' if kind is None else f'-{kind}'}-{threads}threads-{mode}"
            params.append(pytest.param(entry, config, i, kind, threads, mode, id=name))
    return params


_CASE_NAMES = ("entry", "config", "index", "kind", "threads", "mode")


def _storage(keys: list[str], index: int, choices: tuple[torch.dtype, ...]) -> dict[str, Any]:
    """A storage dtype per state key, varied over the keys and the configurations, so that
    each optimizer runs each dtype, and several at once where it has several keys."""
    dtypes = {key: choices[(index + k) % len(choices)] for k, key in enumerate(keys)}
    if keys and all(d == choices[-1] for d in dtypes.values()):
        dtypes[keys[0]] = choices[0]  # at least one key in another dtype than the default
    return dtypes


def _bits(t: torch.Tensor) -> torch.Tensor:
    kinds = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.detach().reshape(-1).view(kinds[t.element_size()])


def assert_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same dtype, shape and bits; NaN where the other has NaN (any NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan = a.isnan().reshape(-1)
    assert torch.equal(nan, b.isnan().reshape(-1))
    same = _bits(a)[~nan] == _bits(b)[~nan]
    assert bool(same.all()), (a.reshape(-1)[~nan][~same][:5], b.reshape(-1)[~nan][~same][:5])


def _grads(shapes: list[torch.Size], gen: torch.Generator, dtype: torch.dtype) -> list[Any]:
    grads = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        g.view(-1)[::7] = 0  # moments of zero (MKL's sqrt treats them apart)
        g.view(-1)[3::11] *= 1e4 if dtype == F16 else 1e15  # past float16's range in squares
        g.view(-1)[9::23] *= 1e-20 if dtype != F16 else 1e-4  # subnormal in squares
        grads.append(g)
    return grads


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _round(t: torch.Tensor, dtype: torch.dtype) -> None:
    """``t`` (float32) rounded in place through ``dtype``, as ``state.copy_(s)`` stores it."""
    if dtype != t.dtype:
        t.copy_(t.to(dtype).float())


def _vector_keys(opt: Any) -> list[str]:
    keys = []
    for key in type(opt).state_keys:
        found = [s[key] for s in opt.state.values() if key in s]
        if found and isinstance(found[0], torch.Tensor) and found[0].dim() > 0:
            keys.append(key)
    return keys


def _compare(
    entry: Entry,
    config: dict[str, Any],
    index: int,
    mode: str,
    threads: int,
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype = F32,
    fused: bool = False,
    storage: dict[str, torch.dtype] | None = None,
    choices: tuple[torch.dtype, ...] = (BF16, F16, F32),
    shapes: list[tuple[int, ...]] | None = None,
    grads: Any = None,
    steps: int = 6,
) -> Any:
    """Steps ``entry``'s optimizer with ``dtype`` parameters and state stored as ``storage``
    (by default varied per key with ``index`` over ``choices``, whose last is the default),
    and its twin; compares them at the end."""
    if mode == "interpreted":
        monkeypatch.setattr(_compiled, "_slots", {})
        monkeypatch.setenv("POLYAK_COMPILE", "0")
    gen = torch.Generator().manual_seed(index)
    sizes = [torch.Size(s) for s in shapes or (HALF_SHAPES if dtype != F32 else SHAPES)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in sizes]
    twins = [p.detach().float().clone().requires_grad_() for p in params]
    kwargs = {**clone_kwargs(config), **({"fused": True} if fused else {})}
    opt = entry.cls(params, **kwargs)
    ref = cast(Any, entry.reference)(twins, **clone_kwargs(kwargs))
    for q in twins:  # state made by the constructor (Adagrad's), in the parameters' dtype
        for value in ref.state[q].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                _round(value, dtype)
    grads = grads or (lambda gen: _grads(sizes, gen, dtype))
    gen = torch.Generator().manual_seed(100 + index)
    with _threads(threads):
        for k in range(steps):
            for p, q, g in zip(params, twins, grads(gen), strict=True):
                p.grad, q.grad = g, g.float().clone()
            opt.step()
            ref.step()
            if k == 0:
                # The state is made by the first step, in the parameters' dtype: stored
                # narrower or wider from here on.
                keys = _vector_keys(opt)
                if storage is None:
                    storage = _storage(keys, index, choices)
                for p in params:
                    for key, kind in storage.items():
                        opt.state[p][key] = opt.state[p][key].to(kind)
            else:
                assert flat.last_path(opt, opt.param_groups[0])[0], polyak.explain(opt)
            assert storage is not None
            for q in twins:
                _round(q.data, dtype)
                for key, kind in storage.items():
                    if k == 0:  # made in the parameters' dtype, then converted
                        _round(ref.state[q][key], dtype)
                    _round(ref.state[q][key], kind)
            if k == 1 and mode == "compiled":
                assert _compiled.wait(timeout=300)
    plans = [e.plan for e in flat.entries(opt) if e.plan is not None]
    assert plans
    if mode == "compiled":
        assert all(plan.compiled_steps >= steps - 3 for plan in plans)
        assert "flat, compiled" in str(polyak.explain(opt))
    else:
        assert all(plan.compiled_steps == 0 for plan in plans)
    assert storage is not None
    for p, q in zip(params, twins, strict=True):
        assert_bits(p, q.to(dtype))
        for key, value in ref.state[q].items():
            mine = opt.state[p][key]
            assert mine.dtype == (storage.get(key, value.dtype) if mine.dim() else value.dtype)
            assert_bits(mine, value.to(mine.dtype))
    return opt


def _mode(mode: str) -> str:
    if mode == "compiled" and (_toolchain.compiler() is None or not _compiled.compiles()):
        pytest.skip("no C++ compiler: programs are interpreted")
    return mode


@needs_kernel
@pytest.mark.parametrize(_CASE_NAMES, _cases(fused=False))
def test_float32_parameters_with_state_of_each_dtype(
    entry: Entry,
    config: dict[str, Any],
    index: int,
    kind: Any,
    threads: int,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default step: torch's per-tensor float32 numbers on state widened and rounded."""
    _compare(entry, config, index, _mode(mode), threads, monkeypatch)


@needs_kernel
@pytest.mark.parametrize(_CASE_NAMES, _cases(fused=True))
def test_fused_float32_parameters_with_state_of_each_dtype(
    entry: Entry,
    config: dict[str, Any],
    index: int,
    kind: Any,
    threads: int,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fused=True``: torch's fused float32 numbers on state widened and rounded."""
    _compare(entry, config, index, _mode(mode), threads, monkeypatch, fused=True)


@needs_kernel
@pytest.mark.parametrize(_CASE_NAMES, _cases(fused=True, kinds=(BF16, F16)))
def test_half_parameters_with_state_of_each_dtype(
    entry: Entry,
    config: dict[str, Any],
    index: int,
    kind: torch.dtype,
    threads: int,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fused=True`` on float16 and bfloat16 parameters, computing in float32 as torch's fused
    kernels do, with state in float32 or the other half type beside them: the numbers of
    torch's fused float32 step on the widened parameters, each rounded to its dtype."""
    dtype = kind
    other = BF16 if dtype == F16 else F16
    choices = (F32, other, dtype)
    _compare(entry, config, index, _mode(mode), threads, monkeypatch, dtype, True, choices=choices)


def _sgd() -> Entry:
    return next(e for e in REGISTRY if e.cls.__name__ == "SGD")


#: Values whose rounding tells conversions apart: ties to even (down and up) and just off them
#: in both half types, float16's overflow (65519 rounds to 65504, 65520 to inf) and its
#: subnormals, float32's subnormals (bfloat16 keeps them), the largest float (bfloat16 rounds it
#: to inf), signed zeros, infinities and NaN.
SPECIAL = [
    *(
        torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
        for bits in (0x3F808000, 0x3F818000, 0xBF808000 - (1 << 32), 0x3F808001, 0x3F807FFF)
    ),
    1 + 2**-11,
    1 + 3 * 2**-11,
    2**-25,
    3 * 2**-25,
    1e-7,
    6.1e-5,
    65519.0,
    65520.0,
    -1e6,
    1e-39,
    -1e-39,
    2**-149,
    1.1754942e-38,
    3.4028235e38,
    -0.0,
    float("inf"),
    float("-inf"),
    float("nan"),
]


def _special_grads(numel: int) -> Any:
    def grads(gen: torch.Generator) -> list[torch.Tensor]:
        g = torch.randn(numel, generator=gen)
        # Spread over vectors of their own, so that most vectors hold none.
        g[: 37 * len(SPECIAL) : 37] = torch.tensor(SPECIAL)
        return [g]

    return grads


@needs_kernel
@pytest.mark.parametrize("kind", [BF16, F16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_state_rounds_as_torch_converts_on_special_values(
    kind: torch.dtype, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGD's momentum buffer (``0.5 * buf + grad``) takes every value of ``SPECIAL``: each
    stored as ``Tensor.to`` rounds it."""
    _compare(
        _sgd(),
        {"lr": 0.1, "momentum": 0.5},
        0,
        _mode(mode),
        1,
        monkeypatch,
        storage={"momentum_buffer": kind},
        shapes=[(37 * len(SPECIAL) + 5,)],
        grads=_special_grads(37 * len(SPECIAL) + 5),
    )


@needs_kernel
@pytest.mark.parametrize("kind", [BF16, F16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_state_rounds_as_torch_converts_on_random_floats(
    kind: torch.dtype, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients of random bits: every exponent and mantissa, subnormals, infinities and NaNs
    of each sign pass through the buffer's rounding."""
    numel = 1 << 16

    def grads(gen: torch.Generator) -> list[torch.Tensor]:
        bits = torch.randint(-(2**31), 2**31, (numel,), generator=gen, dtype=torch.int64)
        return [bits.to(torch.int32).view(torch.float32)]

    _compare(
        _sgd(),
        {"lr": 0.1, "momentum": 0.5},
        1,
        _mode(mode),
        1,
        monkeypatch,
        storage={"momentum_buffer": kind},
        shapes=[(numel,)],
        grads=grads,
    )


@needs_kernel
@pytest.mark.parametrize("kind", [BF16, F16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_every_stored_value_widens_exactly(
    kind: torch.dtype, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffer holding each of the 65536 values of ``kind``, stepped with zero gradients and
    momentum 1, is stored back as it was (NaNs as NaN): ``buf * 1 + -0.0`` is ``buf``."""
    if mode == "interpreted":
        monkeypatch.setattr(_compiled, "_slots", {})
        monkeypatch.setenv("POLYAK_COMPILE", "0")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(kind)
    p = torch.zeros(every.numel(), requires_grad=True)
    opt = polyak.SGD([p], lr=0.0, momentum=1.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.state[p]["momentum_buffer"] = every.clone()
    for k in range(4):
        p.grad = torch.full_like(p, -0.0)
        opt.step()
        if k == 0 and mode == "compiled":
            assert _compiled.wait(timeout=300)
    assert flat.last_path(opt, opt.param_groups[0]) == (True, mode == "compiled", "")
    assert_bits(opt.state[p]["momentum_buffer"], every)


@needs_kernel
def test_a_state_tensor_given_another_dtype_is_never_read_as_the_planned_one() -> None:
    """The plan reads each key's dtype when it is made and checks it at every step: a state
    tensor given memory of another dtype by ``.data =`` (float16 where bfloat16 was planned,
    the same size) sends the step off the kernel; replaced by assignment (for every parameter:
    a key is stored in one dtype per group), the plan is made anew for it."""
    params = [torch.randn(n, requires_grad=True) for n in (1000, 37)]
    opt = polyak.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[p][key] = opt.state[p][key].to(BF16)
    opt.step()
    assert flat.last_path(opt, opt.param_groups[0])[0]
    state = opt.state[params[1]]["exp_avg"]
    state.data = state.data.to(F16)
    assert flat.check(opt, opt.param_groups[0]) is False
    for p in params:
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].to(F16)
    opt.step()
    assert flat.last_path(opt, opt.param_groups[0])[0]
    assert [opt.state[params[0]][key].dtype for key in ("exp_avg", "exp_avg_sq")] == [F16, BF16]


@needs_kernel
def test_what_the_kernel_does_not_take_says_why() -> None:
    assert _plan.storage_dtypes(F32, ["a", "b", "c"], [{BF16}, {F16}, {F32}]) == (BF16, F16, F32)
    assert _plan.storage_dtypes(BF16, ["a"], [{F32}]) == (F32,)
    assert _plan.storage_dtypes(torch.float64, ["a"], [{torch.float64}]) == (torch.float64,)
    assert "bfloat16 and float32 in one group" in str(
        _plan.storage_dtypes(F32, ["a"], [{F32, BF16}])
    )
    for params, state in ((F32, torch.float64), (torch.float64, F32), (torch.float64, BF16)):
        reason = _plan.storage_dtypes(params, ["exp_avg"], [{state}])
        assert isinstance(reason, str) and "'exp_avg' is stored in" in reason
    # The kernel refuses a plan it would read wrongly, whatever Python asks.
    assert vm is not None
    p = torch.zeros(3)
    with pytest.raises(RuntimeError, match="beside"):
        wide = torch.zeros(3, dtype=torch.float64)
        vm.Plan([p], [[wide]], [], {}, 0, [], 64, vdtype=[torch.float64])


def test_generated_code_converts_each_stream_in_registers() -> None:
    """Each state register's storage type is part of the program's source (and so of its
    cache key): loaded and stored through the prelude's conversions, on whole vectors and
    per element."""
    opt = polyak.Adam([torch.zeros(3, requires_grad=True)], lr=1e-3)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    program = _trace.trace(polyak.Adam.update, hyper, ["exp_avg", "exp_avg_sq"], ["step"])
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]

    def source(*state: torch.dtype) -> str:
        text = _codegen.generate(
            vcode, 4, program.stored, F32, _codegen.SQRT_EXACT, state_dtypes=state
        )
        return text[text.index('extern "C" void polyak_run') :]

    plain = source()
    assert source(F32, F32) == plain
    mixed = source(BF16, F16)
    assert mixed != plain
    assert "uint16_t* __restrict m2" in mixed and "float* __restrict m0" in mixed
    vector = mixed[mixed.index("#if PK_W") : mixed.index("#else")]
    body = vector[vector.index("j < 64; j += PK_W) {") : vector.index("} else {")]
    assert body.count("pk_ld_bf16(m2 + j0 + j)") == 1 and body.count("pk_ld_f16(m3") == 1
    assert body.count("pk_st_bf16(m2") == 1 and body.count("pk_st_f16(m3") == 1
    assert body.count("pk_ld(m0") == 1 and body.count("pk_st(m0") == 1
    scalar = mixed[mixed.index("#else") :]
    assert "pk_bf16_load(m2[j0 + j])" in scalar and "pk_f16_store(v3)" in scalar
    with pytest.raises(ValueError, match="beside"):
        source(torch.float64, F32)


_CONVERSIONS = r"""
/* Over n float32 bit patterns from a counter-based generator, how many the whole-vector
   conversions narrow or widen otherwise than the per-element ones (a NaN as any NaN). */
static uint32_t pk_mix(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
  return (uint32_t)(x ^ (x >> 33));
}
static int pk_half_nan(uint16_t h, int bf) {
  return bf ? (h & 0x7fffu) > 0x7f80u : (h & 0x7fffu) > 0x7c00u;
}
extern "C" int64_t polyak_check_conversions(int64_t n) {
  int64_t wrong = 0;
#if PK_W
  for (int64_t i = 0; i < n; i += PK_W) {
    float in[PK_W];
    uint16_t h[PK_W], b[PK_W], hv[PK_W], bv[PK_W], raw[PK_W];
    for (int k = 0; k < PK_W; ++k) {
      raw[k] = (uint16_t)pk_mix((uint64_t)(i + k) << 20);
      const uint32_t bits = pk_mix((uint64_t)(i + k));
      /* Every eighth vector holds only narrow exponents: subnormals, ties and overflow. */
      in[k] = pk_bits_f((i / PK_W) % 8 ? bits : (bits & 0x807fffffu) | ((bits & 7u) << 27));
      h[k] = pk_f16_store(in[k]);
      b[k] = pk_bf16_store(in[k]);
    }
    pk_st_f16(hv, pk_ld(in));
    pk_st_bf16(bv, pk_ld(in));
    const pk_vf wf = pk_ld_f16(raw), wb = pk_ld_bf16(raw);
    for (int k = 0; k < PK_W; ++k) {
      wrong += hv[k] != h[k] && !(pk_half_nan(hv[k], 0) && pk_half_nan(h[k], 0));
      wrong += bv[k] != b[k] && !(pk_half_nan(bv[k], 1) && pk_half_nan(b[k], 1));
      const float sf = pk_f16_load(raw[k]), sb = pk_bf16_load(raw[k]);
      wrong += pk_f_bits(wf[k]) != pk_f_bits(sf) && !(wf[k] != wf[k] && sf != sf);
      wrong += pk_f_bits(wb[k]) != pk_f_bits(sb);
    }
  }
#endif
  return wrong;
}
extern "C" int polyak_width(void) { return PK_W; }
"""


@needs_compiler
@pytest.mark.parametrize("flags", [[], ["-mno-avx512f"]], ids=["native", "no-avx512"])
def test_whole_vector_conversions_round_as_the_scalar_ones(flags: list[str], tmp_path: Any) -> None:
    """The prelude's conversions on whole vectors (the CPU's float16 and bfloat16
    instructions where it has them) give the per-element forms' bits, on 2**22 float32
    patterns; built for this CPU, and for 8 lanes where it has AVX-512."""
    import ctypes
    import subprocess

    cpu = _toolchain.cpu_signature().split()
    if flags and "avx512f" not in cpu:
        pytest.skip("needs AVX-512, to build the narrower form beside it")
    source = tmp_path / "conversions.cpp"
    source.write_text(_codegen.PRELUDE + _CONVERSIONS)
    library = tmp_path / "conversions.so"
    cxx = _toolchain.compiler()
    assert cxx is not None
    command = [cxx, *_toolchain.PROGRAM_FLAGS, *flags, "-o", str(library), str(source)]
    subprocess.run(command, check=True, timeout=300)
    built = ctypes.CDLL(str(library))
    built.polyak_check_conversions.restype = ctypes.c_int64
    built.polyak_check_conversions.argtypes = [ctypes.c_int64]
    if flags:
        assert built.polyak_width() == 8
    assert built.polyak_check_conversions(1 << 22) == 0


def test_a_program_with_state_of_each_dtype_builds_for_arm(tmp_path: Any) -> None:
    """On NEON's four lanes too: bfloat16 by the compiler's vector conversions, float16 lane
    by lane."""
    import shutil

    from test_portability import CROSS, _adam_vcode, _assembly

    if shutil.which(CROSS) is None:
        pytest.skip(f"no {CROSS}")
    vcode, stored = _adam_vcode()
    source = _codegen.generate(
        vcode, 5, stored, F32, _codegen.SQRT_EXACT, state_dtypes=[BF16, F16, F32]
    )
    asm = _assembly(source, tmp_path)
    assert "fsqrt\tv" in asm  # whole vectors
