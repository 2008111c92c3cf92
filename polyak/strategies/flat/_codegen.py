"""Writing a traced program as C++: a loop over one work item, every element's update in registers.

The kernel (``kernel/kernel.cpp``) can run a traced vector program by interpretation: one
operation at a time over blocks of 128 elements held in L1 arrays, so every operation loads and
stores its operands again. That is fast enough wherever memory is slow, and compute-bound
wherever it is fast or threads are few. So each program is also turned into C++ here, one
statement per instruction over one element, in a loop the compiler vectorises: every element's
whole update then stays in vector registers, and the parameter, gradient and state are each
read once and written once. The source is the prelude (``kernel/prelude.h``) followed by the
program's ``polyak_run``; ``_compiled.py`` builds it in the background and plugs it into the
kernel.

Numbers. The statements are the interpreter's (one fused multiply-add where torch's kernels
fuse, ``-ffp-contract=off`` so that nothing else is fused), so results are bit-identical to it.
torch's CPU ``sqrt`` is MKL's vector sqrt in high-accuracy mode, which is not correctly
rounded; how the compiled code gets its bits is decided once per machine (see
``_compiled.sqrt_mode``): an inline copy of MKL's algorithm where an exhaustive comparison over
all 2**32 float32 inputs proves it identical on this CPU, a call to MKL on blocks of 64 elements
otherwise. ``fused=True`` steps use the correctly rounded sqrt, as torch's fused kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyak.strategies.flat import _program, _toolchain

#: How a program computes sqrt: correctly rounded inline, MKL's algorithm inline, or MKL called.
SQRT_EXACT, SQRT_MKL_INLINE, SQRT_MKL_CALL = 0, 1, 2
SQRT_NAMES = {
    SQRT_EXACT: "correctly rounded, inline",
    SQRT_MKL_INLINE: "MKL's algorithm, inline (proven identical on this machine)",
    SQRT_MKL_CALL: "MKL, called per block",
}
#: Whether an element lies in the scalar tail of torch's chunk (see kernel.cpp's Work).
_TAIL_TEST = "(tb & (j0 + j >= tail))"
#: What each vector instruction computes for one element, with the interpreter's roundings
#: (one fused multiply-add where torch's CPU kernels fuse; see kernel.cpp), by opcode.
_STATEMENTS = {
    # Negation flips the sign bit, NaN's included, as torch's neg does; written on the bits, so
    # that the compiler does not fold it into a neighbouring multiply-add (whose NaN keeps its
    # sign).
    _program.V_NEG: "{neg}({a})",
    _program.V_ADD: "{fma}({b}, {s}, {a})",
    _program.V_ADD1: "{a} + {b}",
    _program.V_MUL: "{a} * {s}",
    _program.V_DIV: "{a} / {s}",
    _program.V_ADDS: "{a} + {s}",
    # torch's lerp: from the nearer end, so that weights 0 and 1 are exact, with its vectorised
    # body's operands (the coefficient w - 1, NaN of b - a unchanged).
    _program.V_LERP: "pk_lc{k}_ ? {fma}({s}, {b} - {a}, {a}) : {fma}(lw{k}, {b} - {a}, {b})",
    _program.V_ADDCMUL: "{fma}({s} * {b}, {c}, {a})",
    _program.V_ADDCDIV: "{a} + ({s} * {b}) / {c}",
    _program.V_SQRT: "{sqrt}({a})",
    # As torch's maximum: NaN in its vectorised body as ``{body_nan}`` says (all ones on x86
    # vectors, the NaN operand on generic ones), the canonical NaN in the scalar tail of each
    # of its chunks (which also keeps the first of two equal values).
    _program.V_MAX: (
        "(({a} != {a}) | ({b} != {b})) ? (" + _TAIL_TEST + " ? pk_qnan : {body_nan}) "
        ": (" + _TAIL_TEST + " ? ({a} < {b} ? {b} : {a}) : ({a} > {b} ? {a} : {b}))"
    ),
    # torch's fused kernels (see _program.fused_form): the body's rounding of a * s + b * c,
    # and past the tail what the compiler made of its scalar C++; maximum there is std::max.
    _program.V_MULADD: (
        "(" + _TAIL_TEST + " ? {fma}({a}, {s}, {b} * {c}) : {fma}({b}, {c}, {a} * {s}))"
    ),
    _program.V_MAXF: (
        "(" + _TAIL_TEST + " ? ({a} < {b} ? {b} : {a}) : ((({a} != {a}) | ({b} != {b})) "
        "? {body_nan} : ({a} > {b} ? {a} : {b})))"
    ),
    _program.V_COPY: "{a}",
    _program.V_MULV: "{a} * {b}",
    _program.V_DIVV: "{a} / {b}",
    _program.V_ABS: "{abs}({a})",
    # As torch's sign: 0 for zeros (+0) and NaN.
    _program.V_SIGN: "({a} > 0 ? ({t})1 : ({t})0) - ({a} < 0 ? ({t})1 : ({t})0)",
    _program.V_RECIP: "({t})1 / {a}",
    # Masks are booleans, which the compiler turns into vector masks and the selects into
    # blends; ``{bs}`` is ``b``, or the scalar where the instruction has no ``b``.
    **{op: "{a} " + name + " {bs}" for name, op in _program.V_COMPARISONS.items()},
    _program.V_SELECT: "{c} ? {bs} : {a}",
    # Per-tensor conditions are constants of the loop, which is copied for each outcome (see
    # _unswitch): ``pk_if`` is 1 or 0 there, and the compiler drops what is not kept.
    _program.V_SELS: "pk_if{k}_ ? {b} : {a}",
    _program.V_FILL: "{s}",
}
#: Bytes per stream of a block: the loop's unit, and of the prefetches into the next item.
_BLOCK_BYTES = 256
#: How far ahead of the computation the next work item's streams are prefetched (measured on
#: 2000 tensors of 4 KiB: 2 KiB into L1 1.5x slower, 8 KiB no better).
_AHEAD_BYTES = 4096

#: The dtypes programs are compiled for: (storage type, compute type, bytes).
STORAGE = {
    torch.float32: ("float", "float", 4),
    torch.float64: ("double", "double", 8),
    torch.float16: ("uint16_t", "float", 2),
    torch.bfloat16: ("uint16_t", "float", 2),
    # 8-bit block-wise codes (see kernel/quant.h), beside float32 parameters only.
    torch.uint8: ("uint8_t", "float", 1),
}
#: Elements per block of 8-bit state: a program with such state runs one block at a time.
QUANT_BLOCK = 256

#: How a stream of each storage type is read and written per element: widened exactly to the
#: compute type, narrowed to nearest even (see the prelude).
_SCALAR_IO = {
    torch.float32: ("{}", "{}"),
    torch.float64: ("{}", "{}"),
    torch.float16: ("pk_f16_load({})", "pk_f16_store({})"),
    torch.bfloat16: ("pk_bf16_load({})", "pk_bf16_store({})"),
}
#: The suffix of the prelude's whole-vector loads and stores (``pk_ld``, ``pk_ldn``, ``pk_st``,
#: ``pk_stn``) of each storage type, which convert in registers.
_VECTOR_IO = {torch.float32: "", torch.bfloat16: "_bf16", torch.float16: "_f16"}

#: What every program's source starts with.
PRELUDE = _toolchain.source("prelude.h")


def _statement(
    ins: tuple[int, ...], operands: list[str], max_keep: bool = False, **names: str
) -> str:
    """The C++ expression of one vector instruction, on its operands' expressions, with the
    form's names for the type and the functions (``t``, ``fma``, ``neg``, ``sqrt``, ``abs``);
    ``max_keep``: maximum's vector body passes a NaN operand through (else: all ones)."""
    op, _, _, b, _, s = ins
    if op not in _STATEMENTS:
        raise ValueError(f"unknown opcode {op}")
    va, vb, vc = operands
    bs = vb if b >= 0 else f"s{s}"
    body_nan = f"({va} != {va} ? {va} : {vb})" if max_keep else "pk_ones"
    return _STATEMENTS[op].format(
        a=va, b=vb, c=vc, s=f"s{s}", bs=bs, k=s, body_nan=body_nan, **names
    )


def generate(
    vcode: list[tuple[int, ...]],
    n_bound: int,
    stored: list[int],
    dtype: torch.dtype,
    sqrt_mode: int,
    fma: bool = True,
    max_keep: bool = False,
    state_dtypes: Sequence[torch.dtype] = (),
    signed: Sequence[bool] = (),
) -> str:
    """C++ source of one program's compiled form (``polyak_run``), prelude included.

    Each instruction becomes one statement over one element, in a loop over blocks of
    ``_BLOCK_BYTES`` per stream that the compiler vectorises. A sqrt computed by a call over the
    block (see ``_compiled.sqrt_mode``) splits the loop in two: the values the second part
    needs pass through block-sized arrays, which stay in L1.

    Args:
        vcode: the vector program, ``(op, dst, a, b, c, sreg)`` per instruction.
        n_bound: how many registers are bound to memory (parameter, gradient, state).
        stored: the bound registers the program writes.
        dtype: the parameters' and gradients' storage type.
        sqrt_mode: one of ``SQRT_EXACT``, ``SQRT_MKL_INLINE``, ``SQRT_MKL_CALL``.
        fma: whether torch's kernels fuse multiply-adds (see ``_dispatch.Rounding``).
        max_keep: whether maximum's vector body passes a NaN operand through.
        state_dtypes: each state register's storage type (default: ``dtype``), of the same
            compute type; each is converted as it is loaded and stored. ``torch.uint8``: 8-bit
            block-wise codes, whose absmax the kernel passes after the bound streams.
        signed: for each 8-bit state register in order, whether its map is signed.

    A program with 8-bit state runs a quantization block (256 elements, work items start on
    one) at a time: each 8-bit stream is read into a block array, dequantized, before the
    block's loop, which reads and writes it there as float32, and quantized after it (see the
    prelude's ``pk_deq`` and ``pk_quant``), whether or not the program writes it, as the
    reference path quantizes every 8-bit state at every step.
    """
    _, compute, size = STORAGE[dtype]
    types = [dtype, dtype, *(state_dtypes or [dtype] * (n_bound - 2))]
    if len(types) != n_bound or any(STORAGE[t][1] != compute for t in types):
        raise ValueError(f"state stored as {state_dtypes} beside {dtype} parameters")
    quant = [r for r, t in enumerate(types) if t == torch.uint8]
    if quant and (dtype != torch.float32 or len(signed) != len(quant)):
        raise ValueError("8-bit state is taken beside float32 parameters, with one map each")
    # 8-bit streams are float32 block arrays within the block's loop.
    io_types = [torch.float32 if t == torch.uint8 else t for t in types]
    qsigned = dict(zip(quant, signed, strict=True))
    # A block is the parameter's 256 bytes; each stream's prefetches cover its own bytes.
    block = QUANT_BLOCK if quant else _BLOCK_BYTES // size
    ahead = _AHEAD_BYTES // size
    if fma:
        mad = "__builtin_fmaf" if compute == "float" else "__builtin_fma"
    else:
        mad = "pk_mad_f" if compute == "float" else "pk_mad_d"
    fabs = "fabsf" if compute == "float" else "fabs"
    csqrt = "__builtin_sqrtf" if compute == "float" else "__builtin_sqrt"
    if sqrt_mode == SQRT_MKL_INLINE and compute != "float":
        sqrt_mode = SQRT_MKL_CALL

    # Segments of straight-line code, split where sqrt is a call over the block.
    segments: list[list[tuple[int, ...]]] = [[]]
    splits: list[tuple[int, int]] = []  # (source register, destination register)
    for ins in vcode:
        if ins[0] == _program.V_SQRT and sqrt_mode != SQRT_EXACT:
            splits.append((ins[2], ins[1]))
            segments.append([])
        else:
            segments[-1].append(ins)

    def sources(ins: tuple[int, ...]) -> list[int]:
        return [r for r in ins[2:5] if r >= 0]

    # Each segment's live-in temporaries (read before written), and what it writes.
    live_in: list[set[int]] = []
    writes: list[set[int]] = []
    for k, seg in enumerate(segments):
        seen = {splits[k - 1][1]} if k > 0 else set()
        needs: set[int] = set()
        for ins in seg:
            needs.update(r for r in sources(ins) if r not in seen and r >= n_bound)
            seen.add(ins[1])
        if k < len(splits) and splits[k][0] not in seen and splits[k][0] >= n_bound:
            needs.add(splits[k][0])
        live_in.append(needs)
        # What the segment computes, the sqrt result it starts from included.
        writes.append({ins[1] for ins in seg} | ({splits[k - 1][1]} if k > 0 else set()))
    spilled = sorted(set().union(*live_in))
    read_bound = sorted(
        {r for seg in segments for ins in seg for r in sources(ins) if r < n_bound}
        | {src for src, _ in splits if src < n_bound}
        | set(quant)
    )
    sregs = sorted({ins[5] for ins in vcode if ins[5] >= 0})
    # Registers holding masks: never numbers (the trace keeps the two apart).
    masks = {ins[1] for ins in vcode if ins[0] in _program.V_COMPARISONS.values()}

    body: list[str] = []
    for k, seg in enumerate(segments):
        live: set[int] = set()
        lines: list[str] = []

        def use(reg: int, k: int = k, live: set[int] = live, lines: list[str] = lines) -> str:
            if reg not in live:
                live.add(reg)
                if reg in qsigned:
                    value = f"q{reg}[j]"
                elif reg < n_bound:
                    value = _SCALAR_IO[types[reg]][0].format(f"m{reg}[j0 + j]")
                elif k > 0 and reg == splits[k - 1][1]:
                    value = f"sq_out{k - 1}[j]"
                else:
                    value = f"sp{reg}[j]"
                lines.append(f"      {compute} v{reg} = {value};")
            return f"v{reg}"

        if k > 0:
            use(splits[k - 1][1])
        for op, dst, a, b, c, s in seg:
            expr = _statement(
                (op, dst, a, b, c, s),
                [use(r) if r >= 0 else "" for r in (a, b, c)],
                max_keep,
                t=compute,
                fma=mad,
                neg="pk_neg_f" if compute == "float" else "pk_neg_d",
                sqrt=csqrt,
                abs=fabs,
            )
            if dst in live:
                lines.append(f"      v{dst} = {expr};")
            else:
                live.add(dst)
                kind = "bool" if dst in masks else compute
                lines.append(f"      {kind} v{dst} = {expr};")
        if k < len(splits):
            lines.append(f"      sq_in{k}[j] = {use(splits[k][0])};")
        for reg in sorted(writes[k]):
            if reg in stored and reg in qsigned:
                lines.append(f"      q{reg}[j] = v{reg};")
            elif reg in stored:
                store = _SCALAR_IO[types[reg]][1].format(f"v{reg}")
                lines.append(f"      m{reg}[j0 + j] = {store};")
            elif any(reg in live_in[q] for q in range(k + 1, len(segments))):
                lines.append(f"      sp{reg}[j] = v{reg};")
        body.append("      for (int64_t j = 0; j < n; ++j) {")
        body.extend("  " + line for line in lines)
        body.append("      }")
        if k < len(splits):
            if sqrt_mode == SQRT_MKL_INLINE:
                body.append(f"      pk_sqrt_mkl(sq_in{k}, sq_out{k}, n);")
            else:
                call = "vms" if compute == "float" else "vmd"
                body.append(f"      ctx->{call}((int)n, sq_in{k}, sq_out{k}, ctx->mode);")

    conditions = sorted({ins[5] for ins in vcode if ins[0] == _program.V_SELS})
    lerps = sorted({ins[5] for ins in vcode if ins[0] == _program.V_LERP})
    # The constants the loop is copied for: per-tensor conditions first (each copy computes one
    # continuation only), then which end each lerp starts from (each copy keeps one weight).
    switched = [f"pk_if{c}_" for c in conditions[:_UNSWITCHED]]
    switched += [f"pk_lc{s}_" for s in lerps][: _UNSWITCHED + 1 - len(switched)]
    # Streams converted in registers: stored in another type than they compute in.
    converted = any(STORAGE[t][0] != compute for t in types)
    prefetch = _prefetch(read_bound, types, block, ahead, converted)

    out: list[str] = [PRELUDE]
    out.append(
        'extern "C" void polyak_run(void* const* bound, const double* r, int64_t start, '
        "int64_t end, void* const* next, int64_t nstart, int64_t tail, "
        "const struct polyak_ctx* ctx) {"
    )
    for reg in range(n_bound):
        const = "" if reg in stored or reg in qsigned else "const "
        storage = STORAGE[types[reg]][0]
        out.append(f"  {const}{storage}* __restrict m{reg} = ({const}{storage}*)bound[{reg}];")
    for reg in quant:
        out.append(f"  float* __restrict a{reg} = (float*)bound[{n_bound + reg - 2}];")
        out.append(f"  float q{reg}[{block}] __attribute__((aligned(64)));")
    # Each 8-bit stream's block read before the block's loop and written after it.
    enter = [
        f"      pk_deq(m{r} + j0, a{r}[j0 / {block}], ctx->qmap[{int(qsigned[r])}], q{r}, n);"
        for r in quant
    ]
    leave = [
        f"      pk_quant(q{r}, n, m{r} + j0, a{r} + j0 / {block}, ctx, {int(qsigned[r])});"
        for r in quant
    ]
    out.append("  (void)ctx; (void)tail;")
    # float32 compute with sqrt inline (or none): written on whole vectors where the CPU has
    # them, each stream converted from and to its storage type in registers.
    vector = compute == "float" and sqrt_mode != SQRT_MKL_CALL
    if vector:
        out.append("#if PK_W")
        decls, vloop = _vector_form(
            vcode,
            stored,
            sqrt_mode,
            sregs,
            lerps,
            masks,
            conditions,
            fma,
            max_keep,
            types=io_types,
            block=block,
            quant=quant,
            enter=enter,
            leave=leave,
        )
        out.extend(decls)
        out.extend(_unswitch([*prefetch, *vloop], switched))
        out.append("#else")
    for s in sregs:
        out.append(f"  const {compute} s{s} = ({compute})r[{s}];")
    for s in lerps:
        out.append(f"  const int pk_lc{s}_ = {fabs}(s{s}) < ({compute})0.5;")
        out.append(f"  const {compute} lw{s} = s{s} - ({compute})1;")
    n_arrays = len(spilled) + 2 * len(splits)
    if n_arrays:
        out.append(f"  {compute} sp_all[{n_arrays}][{block}] __attribute__((aligned(64)));")
    index = 0
    for reg in spilled:
        out.append(f"  {compute}* __restrict const sp{reg} = sp_all[{index}];")
        index += 1
    for k in range(len(splits)):
        out.append(f"  {compute}* __restrict const sq_in{k} = sp_all[{index}];")
        out.append(f"  {compute}* __restrict const sq_out{k} = sp_all[{index + 1}];")
        index += 2
    ones = "pk_bits_f(0xffffffffu)" if compute == "float" else "pk_bits_d(~0ull)"
    qnan = "pk_bits_f(0x7fc00000u)" if compute == "float" else "pk_bits_d(0x7ff8000000000000ull)"
    out.append(f"  const {compute} pk_ones = {ones}, pk_qnan = {qnan};")
    out.append("  (void)pk_ones; (void)pk_qnan;")
    for s in conditions:
        out.append(f"  const int pk_if{s}_ = s{s} != 0;")
    loop: list[str] = [*prefetch]
    loop.append(f"    if (end - j0 >= {block}) {{")
    loop.append(f"      const int64_t n = {block};")
    loop.extend(enter)
    loop.extend(_short_of_tail(body, _TAIL_TEST))
    loop.extend(leave)
    loop.append("    } else {")
    loop.append("      const int64_t n = end - j0;")
    loop.extend(enter)
    loop.extend(body)
    loop.extend(leave)
    loop.append("    }")
    loop.append("  }")
    out.extend(_unswitch(loop, switched))
    if vector:
        out.append("#endif")
    out.append("}")
    return "\n".join(out) + "\n"


def _prefetch(
    read_bound: list[int], types: list[torch.dtype], block: int, ahead: int, within: bool
) -> list[str]:
    """The head of the loop over blocks: past the end of the item, every stream the program
    reads is asked for, into L2, that far into the next item (the hardware prefetcher follows
    a stream within a page but stops at a page's end, let alone a tensor's; within an item it
    does better alone, where ``within`` is false); and whether the block reaches torch's
    scalar tail, a constant of the block, so that the usual blocks' loop is free of the test.

    ``within``: the streams are also asked for within the item, the same distance ahead, with
    intent to write. Where streams are converted in registers (state stored narrower than it
    computes), the conversions cost the core enough that at one thread the hardware
    prefetcher alone fell behind: Adam with bfloat16 moments on 8 tensors of 1M floats took
    3.8 ms a step without, 3.0 ms with (prefetches for reading only: 3.3 ms); with float32
    moments it made the step 4% slower."""
    lines = [f"  for (int64_t j0 = start; j0 < end; j0 += {block}) {{"]
    lines.append(f"    const int64_t pf = j0 + {ahead};")
    lines.append("    if (pf >= end && next != 0) {")
    lines.append("      const int64_t at = nstart + (pf - end);")
    for reg in read_bound:
        storage, _, size = STORAGE[types[reg]]
        for q in range(0, block * size, 64):
            lines.append(
                f"      __builtin_prefetch((const char*)((const {storage}*)next[{reg}] + at)"
                f" + {q}, 0, 2);"
            )
    if within:
        lines.append("    } else if (pf < end) {")
        for reg in read_bound:
            for q in range(0, block * STORAGE[types[reg]][2], 64):
                lines.append(f"      __builtin_prefetch((const char*)(m{reg} + pf) + {q}, 1, 2);")
    lines.append("    }")
    lines.append(f"    const int tb = j0 + {block} > tail;")
    lines.append("    (void)tb;")
    return lines


def _short_of_tail(block: list[str], test: str) -> list[str]:
    """The lines of a block's loop, where they hold torch's tail ``test``, preceded by a copy
    without it for the blocks short of the tail (``tb`` false): the compiler vectorises that
    copy, where the test makes the loop's control flow its own."""
    fast = [line.replace(test, "0") for line in block]
    if fast == block:
        return block
    return [
        "      if (!tb) {",
        *("  " + line for line in fast),
        "      } else {",
        *("  " + line for line in block),
        "      }",
    ]


#: The tail test on whole vectors: the lanes at or past the tail.
_TAIL_TEST_V = "pk_tailv(tb, tail - (j0 + j))"


def _vector_form(
    vcode: list[tuple[int, ...]],
    stored: list[int],
    sqrt_mode: int,
    sregs: list[int],
    lerps: list[int],
    masks: set[int],
    conditions: list[int],
    fma: bool = True,
    max_keep: bool = False,
    types: list[torch.dtype] | None = None,
    block: int = _BLOCK_BYTES // 4,
    quant: Sequence[int] = (),
    enter: Sequence[str] = (),
    leave: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """The float32 form on whole vectors of ``PK_W`` lanes (see the prelude): one statement
    per instruction over a vector, sqrt inline, each stream loaded and stored once per
    vector (widened from its storage type ``types[reg]``, float32 by default, and narrowed
    back in registers), so that an element's whole update stays in registers. The last vector
    of an item shorter than ``PK_W`` is loaded and stored in part. Returns the declarations
    and the body of the loop over blocks of ``block`` elements. ``quant``: the 8-bit streams,
    read and written in their block arrays, which ``enter`` fills and ``leave`` quantizes."""
    suffix = [_VECTOR_IO[t] for t in types] if types else []

    def io(reg: int) -> str:
        return suffix[reg] if reg < len(suffix) else ""

    sqrt = "pk_sqrt_mklv" if sqrt_mode == SQRT_MKL_INLINE else "pk_sqrtv"

    def body(partial: bool) -> list[str]:
        live: set[int] = set()
        lines: list[str] = []

        def use(reg: int) -> str:
            if reg not in live:
                live.add(reg)
                at, x = (f"q{reg} + j" if reg in quant else f"m{reg} + j0 + j"), io(reg)
                load = f"pk_ldn{x}({at}, n - j)" if partial else f"pk_ld{x}({at})"
                lines.append(f"pk_vf v{reg} = {load};")
            return f"v{reg}"

        written: set[int] = set()
        for op, dst, a, b, c, s in vcode:
            expr = _statement(
                (op, dst, a, b, c, s),
                [use(r) if r >= 0 else "" for r in (a, b, c)],
                max_keep,
                t="float",
                fma="pk_fmav" if fma else "pk_madv",
                neg="pk_negv",
                sqrt=sqrt,
                abs="pk_absv",
            ).replace(_TAIL_TEST, _TAIL_TEST_V)
            written.add(dst)
            if dst in live:
                lines.append(f"v{dst} = {expr};")
            else:
                live.add(dst)
                lines.append(f"{'pk_vm' if dst in masks else 'pk_vf'} v{dst} = {expr};")
        for reg in sorted(written & set(stored)):
            x, at = io(reg), (f"q{reg} + j" if reg in quant else f"m{reg} + j0 + j")
            lines.append(
                f"pk_stn{x}({at}, v{reg}, n - j);" if partial else f"pk_st{x}({at}, v{reg});"
            )
        return lines

    full, part = body(False), body(True)
    out = [f"  const pk_vf s{s} = pk_splat((float)r[{s}]);" for s in sregs]
    for s in lerps:
        out.append(f"  const int pk_lc{s}_ = fabsf((float)r[{s}]) < 0.5f;")
        out.append(f"  const pk_vf lw{s} = pk_splat((float)r[{s}] - 1.0f);")
    out.append("  const pk_vf pk_ones = pk_bitsv(0xffffffffu), pk_qnan = pk_bitsv(0x7fc00000u);")
    out.append("  (void)pk_ones; (void)pk_qnan;")
    for s in conditions:
        out.append(f"  const int pk_if{s}_ = (float)r[{s}] != 0;")
    loop: list[str] = []
    loop.append(f"    if (end - j0 >= {block}) {{")
    if quant:
        loop.append(f"      const int64_t n = {block};")
    loop.extend(enter)
    vectors = [
        f"      for (int64_t j = 0; j < {block}; j += PK_W) {{",
        *("        " + line for line in full),
        "      }",
    ]
    loop.extend(_short_of_tail(vectors, _TAIL_TEST_V))
    loop.extend(leave)
    loop.append("    } else {")
    loop.append("      const int64_t n = end - j0;")
    loop.extend(enter)
    loop.append("      int64_t j = 0;")
    loop.append("      for (; j + PK_W <= n; j += PK_W) {")
    loop.extend("        " + line for line in full)
    loop.append("      }")
    loop.append("      if (j < n) {")
    loop.extend("        " + line for line in part)
    loop.append("      }")
    loop.extend(leave)
    loop.append("    }")
    loop.append("  }")
    return out, loop


#: Per-tensor conditions the element loop is copied for (2**n copies); more stay selects. One
#: more copy may be made for a lerp's weight.
_UNSWITCHED = 2


def _unswitch(loop: list[str], names: list[str]) -> list[str]:
    """``loop`` once per outcome of each of ``names``, constants of the loop that are 1 or 0:
    the conditions of the scalar program it selects on (a branch of the rule on a per-tensor
    number, see ``_program.merge``), and which end a lerp starts from. Each copy computes only
    the continuation it keeps: both continuations' roundings are their own, so the bits are
    those of the select, without the other continuation's work, and no copy tests a constant
    per element or holds the other continuation's numbers in registers."""
    if not names:
        return loop
    name = names[0]
    copies = [_unswitch([line.replace(name, v) for line in loop], names[1:]) for v in "10"]
    return [
        f"  if ({name}) {{",
        *("  " + line for line in copies[0]),
        "  } else {",
        *("  " + line for line in copies[1]),
        "  }",
    ]
