"""The compiled form of each traced program: torch's bits, built off the step path, cached per
machine."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same, clone_kwargs, has_tensor, make_params, twin
from registry import REGISTRY, Entry, ids

import polyak
from polyak.strategies import flat
from polyak.strategies.flat import _codegen, _compiled, _kernel, _program, _toolchain

vm = _kernel.load(wait=True)
needs_compiler = pytest.mark.skipif(
    vm is None or _toolchain.compiler() is None or not _compiled.compiles(),
    reason="the flat kernel or a C++ compiler is unavailable",
)
#: For the bit-exactness tests, which compare the paths that remain where the kernel is off
#: (see :func:`_or_without_the_kernel`): skipped only where it runs but cannot be compiled.
needs_compiler_where_on = pytest.mark.skipif(
    vm is not None and (_toolchain.compiler() is None or not _compiled.compiles()),
    reason="a C++ compiler is unavailable",
)


def _or_without_the_kernel(fallback: Callable[..., None]) -> Callable[..., Any]:
    """The decorated test where the flat kernel runs; where it is off (``POLYAK_NATIVE=0``) or
    cannot be had, ``fallback`` called with the test's arguments in its place: the comparison
    with torch of the paths that steps then take (defined after the tests)."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(test)
        def run(**kwargs: Any) -> None:
            (test if vm is not None else fallback)(**kwargs)

        return run

    return decorate


# Odd sizes, sizes past a block and a tensor without elements: every tail is taken.
SHAPES = [(3, 4), (5,), (300,), (2, 2, 2), (1000,), (0,), (67, 3)]


def _cases(fused: bool = False) -> list[Any]:
    """Every configuration of every optimizer whose default step runs flat."""
    return [
        pytest.param(entry, config, id=f"{ids(entry)}-{i}")
        for entry in REGISTRY
        if entry.flat and not entry.sparse_grads and (entry.fused or not fused)
        for i, config in enumerate(entry.configs)
        if not has_tensor(config)
    ]


def _grads(
    params: list[torch.Tensor], gen: torch.Generator, nan: bool = False
) -> list[torch.Tensor]:
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        # Exact zeros (a moment of zero, whose sqrt MKL computes apart) and huge values.
        g.view(-1)[::7] = 0
        g.view(-1)[3::11] *= 1e18 if p.dtype == torch.float64 else 1e15
        if nan:
            # NaN through every operation, with its sign (negated under ``maximize``).
            g.view(-1)[5::13] = float("nan")
        grads.append(g)
    return grads


def _plans(opt: Any) -> list[Any]:
    return [e.plan for e in flat.entries(opt) if e.plan is not None]


def _run(
    opt: Any,
    params: list[torch.Tensor],
    steps: int,
    gen: torch.Generator,
    wait_after: int = 2,
    nan_last: bool = False,
) -> None:
    for k in range(steps):
        nan = nan_last and k == steps - 1
        for p, g in zip(params, _grads(params, gen, nan), strict=True):
            p.grad = g
        opt.step()
        if k + 1 == wait_after:
            assert _compiled.wait(timeout=300)


@needs_compiler_where_on
@pytest.mark.parametrize(("entry", "config"), _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@_or_without_the_kernel(lambda **kw: _remaining_path_is_torchs(**kw))
def test_compiled_kernel_is_bit_identical_to_torch(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype
) -> None:
    params = make_params(SHAPES, dtype=dtype)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    _run(opt, params, 6, torch.Generator().manual_seed(1), nan_last=True)
    _run(ref, ref_params, 6, torch.Generator().manual_seed(1), nan_last=True)
    plans = _plans(opt)
    assert plans and all(plan.compiled_steps >= 4 for plan in plans)
    # Bit for bit, NaNs included (eps=0 makes 0/0, and the last step's gradients hold NaNs).
    assert_same(_bits(params), _bits(ref_params))
    assert_same(_bits(opt.state_dict()["state"]), _bits(ref.state_dict()["state"]))


@pytest.mark.parametrize(("entry", "config"), _cases())
@_or_without_the_kernel(lambda **kw: _remaining_path_is_torchs(**kw, other_strategy=True))
def test_interpreted_programs_are_bit_identical_to_torch(
    entry: Entry, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps interpret a program until its build is done (always, with POLYAK_COMPILE=0):
    torch's bits there too, selects and per-tensor branches included."""
    monkeypatch.setattr(_compiled, "_slots", {})
    monkeypatch.setenv("POLYAK_COMPILE", "0")
    params = make_params(SHAPES)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    _run(opt, params, 6, torch.Generator().manual_seed(1), wait_after=-1, nan_last=True)
    _run(ref, ref_params, 6, torch.Generator().manual_seed(1), wait_after=-1, nan_last=True)
    plans = _plans(opt)
    assert plans and all(plan.compiled_steps == 0 for plan in plans)
    assert_same(_bits(params), _bits(ref_params))
    assert_same(_bits(opt.state_dict()["state"]), _bits(ref.state_dict()["state"]))


def _bits(value: Any) -> Any:
    """Tensors, nested in dicts and lists, as their bytes (with their dtype)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.detach().reshape(-1).view(torch.uint8))
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bits(v) for v in value]
    return value


@needs_compiler_where_on
@pytest.mark.parametrize(("entry", "config"), _cases(fused=True))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@_or_without_the_kernel(lambda **kw: _remaining_fused_path_is_torchs(**kw))
def test_compiled_fused_steps_equal_the_interpreter_bit_for_bit(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fused=True``: storage rounding of half types and the correctly rounded sqrt."""
    params = make_params(SHAPES, dtype=dtype)
    other = twin(params)
    opt = entry.cls(params, fused=True, **clone_kwargs(config))
    _run(opt, params, 5, torch.Generator().manual_seed(2), nan_last=True)
    assert all(plan.compiled_steps >= 3 for plan in _plans(opt))
    monkeypatch.setattr(_compiled, "_slots", {})
    monkeypatch.setenv("POLYAK_COMPILE", "0")
    slow = entry.cls(other, fused=True, **clone_kwargs(config))
    _run(slow, other, 5, torch.Generator().manual_seed(2), nan_last=True)
    assert all(plan.compiled_steps == 0 for plan in _plans(slow))
    for a, b in zip(params, other, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_compiler_where_on
@_or_without_the_kernel(lambda **kw: _remaining_momentum_path_is_torchs())
def test_steps_run_before_the_build_is_done_and_switch_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an empty cache the first steps interpret the program, with the same numbers, and
    the build lands in the cache for later processes."""
    monkeypatch.setenv("POLYAK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_compiled, "_slots", {})
    entry = next(e for e in REGISTRY if e.cls.__name__ == "SGD")
    params = make_params(SHAPES)
    ref_params = twin(params)
    opt = entry.cls(params, lr=0.1, momentum=0.9)
    ref = entry.reference(ref_params, lr=0.1, momentum=0.9)
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _run(opt, params, 2, gen, wait_after=-1)
    _run(ref, ref_params, 2, ref_gen)
    assert [plan.compiled_steps for plan in _plans(opt)] == [0]
    assert _compiled.wait(timeout=300)
    _run(opt, params, 3, gen, wait_after=-1)
    _run(ref, ref_params, 3, ref_gen)
    assert [plan.compiled_steps for plan in _plans(opt)] == [3]
    assert_same(params, ref_params)
    assert list(tmp_path.glob("*/program-*.so"))


def test_the_cache_is_keyed_by_cpu_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code built with -march=native never loads on another CPU type sharing the cache."""
    if _toolchain.compiler() is None:
        pytest.skip("no C++ compiler")
    root = _toolchain.cache_dir()
    here = _compiled.target("int x;", "program", root)
    monkeypatch.setattr(_toolchain, "_machine_keys", {})
    monkeypatch.setattr(_toolchain, "cpu_signature", lambda: "x86_64|another CPU|sse2")
    there = _compiled.target("int x;", "program", root)
    assert here is not None and there is not None
    assert here.name == there.name and here.parent != there.parent


@needs_compiler
def test_the_inline_sqrt_is_mkl_on_every_input() -> None:
    """Where compiled programs compute MKL's sqrt inline, an exhaustive comparison with the
    MKL function torch calls (every non-negative float32, the negative range sampled, and
    the special values) finds no difference; and it is needed, as MKL is not correctly
    rounded there."""
    mode = _compiled.sqrt_mode(vm)
    if mode != _codegen.SQRT_MKL_INLINE:
        pytest.skip(f"this machine's programs do not compute sqrt inline (mode {mode})")
    assert _compiled.probe_sqrt(vm, 0) == 0
    assert _compiled.probe_sqrt(vm, 1) > 0


@needs_compiler
def test_the_eight_lane_inline_sqrt_is_mkl_too(tmp_path: Path) -> None:
    """Machines with AVX2 but not AVX-512 compute the inline sqrt on 8 lanes: built so here,
    it too gives MKL's result on every input."""
    import ctypes
    import subprocess

    if "avx512f" not in _toolchain.cpu_signature().split() or (
        _compiled.sqrt_mode(vm) != _codegen.SQRT_MKL_INLINE
    ):
        pytest.skip("needs AVX-512 (to build the other width) and the inline sqrt")
    source = tmp_path / "probe.cpp"
    source.write_text(
        _toolchain.source("sqrt_probe.cpp") + 'extern "C" int width() { return PK_W; }\n'
    )
    library = tmp_path / "probe.so"
    cxx = _toolchain.compiler()
    assert cxx is not None
    flags = [*_toolchain.PROGRAM_FLAGS, "-mno-avx512f"]
    subprocess.run([cxx, *flags, "-o", str(library), str(source)], check=True, timeout=300)
    probe = ctypes.CDLL(str(library))
    assert probe.width() == 8
    assert _compiled.run_probe(probe, vm, 0) == 0


def test_generated_code_keeps_each_element_in_registers() -> None:
    """float32 programs are written on whole vectors: one loop, each stream loaded and stored
    once per vector, sqrt inline (correctly rounded or MKL's algorithm); without vectors, or
    where sqrt is a call, one statement per element, the call splitting the loop and handing
    values over through block arrays."""
    from polyak.strategies.flat import _trace

    entry = next(e for e in REGISTRY if e.cls.__name__ == "Adam")
    opt = entry.cls([torch.zeros(3, requires_grad=True)], lr=1e-3)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    program = _trace.trace(entry.cls.update, hyper, ["exp_avg", "exp_avg_sq"], ["step"])
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]

    def kernel(dtype: torch.dtype, mode: int) -> str:
        source = _codegen.generate(vcode, 4, program.stored, dtype, mode)
        return source[source.index('extern "C" void polyak_run') :]

    inline = {_codegen.SQRT_EXACT: "pk_sqrtv(", _codegen.SQRT_MKL_INLINE: "pk_sqrt_mklv("}
    for mode, sqrt in inline.items():
        source = kernel(torch.float32, mode)
        vector = source[source.index("#if PK_W") : source.index("#else")]
        body = vector[vector.index("j < 64; j += PK_W) {") : vector.index("} else {")]
        assert body.count("for (int64_t j") == 0
        for reg in range(4):
            assert body.count(f"pk_ld(m{reg} + j0 + j)") == 1  # one load each
        assert body.count("pk_st(") == len(program.stored)
        assert body.count(sqrt) == 1
        scalar = source[source.index("#else") :]
        body = scalar[scalar.index("const int64_t n = 64;") : scalar.index("} else {")]
        assert body.count("for (int64_t j") == (1 if mode == _codegen.SQRT_EXACT else 2)
    called = kernel(torch.float32, _codegen.SQRT_MKL_CALL)
    assert "#if PK_W" not in called  # MKL over blocks: no whole-vector form
    body = called[called.index("const int64_t n = 64;") : called.index("} else {")]
    assert body.count("for (int64_t j") == 2 and "ctx->vms((int)n, sq_in0, sq_out0" in body
    exact = kernel(torch.float64, _codegen.SQRT_EXACT)
    assert "#if PK_W" not in exact
    body = exact[exact.index("const int64_t n = 32;") : exact.index("} else {")]
    assert body.count("for (int64_t j") == 1 and body.count("__builtin_sqrt(") == 1
    for reg in range(4):
        assert body.count(f"m{reg}[j0 + j];") == 1


def test_a_branch_on_a_per_tensor_number_copies_the_loop_per_outcome() -> None:
    """RAdam's rectification (``rho_t > 5``) is traced both ways and the parameter selected per
    tensor; the generated code runs one copy of the element loop per outcome, each computing
    its own continuation only."""
    from polyak.strategies.flat import _trace

    opt = polyak.RAdam([torch.zeros(3, requires_grad=True)])
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    program = _trace.trace(polyak.RAdam.update, hyper, ["exp_avg", "exp_avg_sq"], ["step"])
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]
    assert [row[1] for row in vcode if row[0] == _program.V_SELS] == [0]
    source = _codegen.generate(vcode, 4, program.stored, torch.float32, _codegen.SQRT_EXACT)
    source = source[source.index('extern "C" void polyak_run') :]
    vector, scalar = source[: source.index("#else")], source[source.index("#else") :]
    for form in (vector, scalar):  # on whole vectors, and per element
        # A copy per outcome of the condition, each copied again for the end its lerp of the
        # first moment starts from.
        assert form.count("for (int64_t j0") == 4
        # Declared, then tested once: inside the copies the condition is a constant.
        assert form.count("pk_if") == 2 and "1 ? " in form and "0 ? " in form
        # Declared, then tested in each copy of the condition.
        assert form.count("pk_lc") == 3


@needs_compiler
def test_an_unwritable_cache_falls_back_and_a_dead_build_is_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that cannot be written (here a file where the folder should be) sends builds to
    the per-user fallback; a dead build's folder, with no lock, stops nothing and is removed."""
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    fallback = tmp_path / "fallback"
    monkeypatch.setenv("POLYAK_CACHE_DIR", str(blocked))
    monkeypatch.setattr(_toolchain, "roots", lambda: [blocked, fallback])
    source = _codegen.PRELUDE + 'extern "C" int polyak_probe_value() { return 7; }\n'
    cxx = _toolchain.compiler()
    assert cxx is not None
    folder = fallback / _toolchain.machine_key(cxx)
    dead = folder / ".build-dead"
    dead.mkdir(parents=True)
    (dead / "program.cpp").write_text("half written")
    os.utime(dead, (0, 0))
    built = _compiled.build(source, "program")
    assert built is not None and built.parent == folder
    assert _compiled._open(built).polyak_probe_value() == 7
    assert not dead.exists()
    assert _compiled.cached(source, "program") == built


@needs_compiler_where_on
@pytest.mark.parametrize("numel", [4, 31, 100, 70_001], ids=str)
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"{t}threads")
def test_amsgrad_nan_bits_are_torchs_in_body_and_tail(numel: int, threads: int) -> None:
    """torch's maximum writes NaN as all ones in its vectorised body and as the canonical NaN
    in each thread chunk's scalar tail; the compiled and interpreted steps write the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for cls in (torch.optim.Adam, polyak.Adam):
            p = torch.nn.Parameter(torch.linspace(-1, 1, numel))
            opt = cls([p], lr=0.01, amsgrad=True)
            gen = torch.Generator().manual_seed(7)
            for k in range(5):
                g = torch.randn(numel, generator=gen)
                if k >= 3:
                    g[:: max(1, numel // 13)] = float("nan")
                    g[-1] = float("nan")
                p.grad = g
                opt.step()
                if k == 1:
                    assert _compiled.wait(timeout=300)
            results.append(
                [
                    t.detach().view(torch.int32 if t.dtype == torch.float32 else torch.int64)
                    for t in (p, opt.state[p]["max_exp_avg_sq"])
                ]
            )
        for mine, theirs in zip(results[1], results[0], strict=True):
            assert torch.equal(mine, theirs)
    finally:
        torch.set_num_threads(before)


# Where the flat kernel is off (POLYAK_NATIVE=0) or cannot be had, steps take the reference
# strategies, per tensor and foreach: the bit-exactness tests above compare those with torch.


def _remaining_path_is_torchs(
    entry: Entry,
    config: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    other_strategy: bool = False,
    **_: Any,
) -> None:
    """Without the kernel, the step of ``config`` (with ``other_strategy``, of the other
    strategy: ``foreach=True`` where it leaves ``foreach`` unset or False) is torch's of the same
    flags, bit for bit, on the inputs of the kernel's tests, NaNs included."""
    if other_strategy:
        config = {**config, "foreach": not config.get("foreach", False)}
    params = make_params(SHAPES, dtype=dtype)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    _run(opt, params, 6, torch.Generator().manual_seed(1), wait_after=-1, nan_last=True)
    _run(ref, ref_params, 6, torch.Generator().manual_seed(1), wait_after=-1, nan_last=True)
    assert not _plans(opt)
    assert_same(_bits(params), _bits(ref_params))
    assert_same(_bits(opt.state_dict()["state"]), _bits(ref.state_dict()["state"]))


def _remaining_fused_path_is_torchs(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, **_: Any
) -> None:
    """Without the kernel, a ``fused=True`` step is torch's foreach step computed in float32
    and stored in the parameters' dtype, as fused kernels compute and store: for each step,
    float32 copies of the parameters, their state and gradients step by torch's foreach
    path, and are rounded back. Bit for bit, NaNs included."""
    params = make_params(SHAPES, dtype=dtype)
    ref_params = twin(params)
    opt = entry.cls(params, fused=True, **clone_kwargs(config))
    gen, ref_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    state: dict[str, Any] | None = None
    for k in range(5):
        nan = k == 4
        for p, g in zip(params, _grads(params, gen, nan), strict=True):
            p.grad = g
        opt.step()
        wide = [p.detach().float().requires_grad_() for p in ref_params]
        ref = entry.reference(wide, foreach=True, **clone_kwargs(config))
        # The state as the parameters' dtype holds it (torch's Adagrad makes it at once).
        held = _cast_state(state or ref.state_dict(), dtype)
        ref.load_state_dict(_cast_state(held, torch.float32))
        for w, g in zip(wide, _grads(ref_params, ref_gen, nan), strict=True):
            w.grad = g.float()
        ref.step()
        with torch.no_grad():
            for p, w in zip(ref_params, wide, strict=True):
                p.copy_(w)
        state = _cast_state(ref.state_dict(), dtype)
    assert not _plans(opt)
    assert_same(_bits(params), _bits(ref_params))
    assert state is not None
    assert_same(_bits(opt.state_dict()["state"]), _bits(state["state"]))


def _cast_state(state_dict: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``state_dict`` with its floating-point state (not its step counters) cast to ``dtype``."""
    return {
        **state_dict,
        "state": {
            i: {
                key: value.to(dtype)
                if isinstance(value, torch.Tensor) and key != "step" and value.is_floating_point()
                else value
                for key, value in entry.items()
            }
            for i, entry in state_dict["state"].items()
        },
    }


def _remaining_momentum_path_is_torchs() -> None:
    """Without the kernel, SGD with momentum steps as torch's, bit for bit."""
    params = make_params(SHAPES)
    ref_params = twin(params)
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    _run(opt, params, 5, torch.Generator().manual_seed(3), wait_after=-1)
    _run(ref, ref_params, 5, torch.Generator().manual_seed(3), wait_after=-1)
    assert not _plans(opt)
    assert_same(params, ref_params)
