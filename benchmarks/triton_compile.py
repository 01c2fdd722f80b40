"""Compiles every Triton kernel x configuration x precision for sm_80 and sm_90 without a GPU.

Triton's compiler runs on the CPU (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``;
its wheel ships ptxas and cuobjdump), so the kernels' resources on real targets can be checked
anywhere: shared memory per block, registers, stack (spills: Triton kernels use no stack
otherwise) and, for sm_90, whether the PTX uses wgmma. Each "<kernel>/<sm90|sm80>/<bucket>"
configuration list compiles for its own target at the bucket's largest executed feature size
(128 for "small", 256 for "large", 512 = 256 + 256 for "xlarge"; ``_launch.d_segments``) in every
mode, and the backward kernels in bf16 also at sizes that take three to five feature segments
(112 = 64 + 32 + 16; 224 = 128 + 64 + 32 and 240 = 128 + 64 + 32 + 16; 448 = 256 + 128 + 64 and
496 = 256 + 128 + 64 + 32 + 16). A "<bucket>-seg3" list (``_launch.list_name``) takes its bucket's
sizes of three or more segments: it compiles at the largest of them in every mode and at the others
in bf16, and its base list then only at the bucket's largest size.

    python benchmarks/triton_compile.py [--jobs 2] [--mode bf16]   # prints the markdown table

Lab code (tests/test_triton_compile.py and the table in docs/kernels.md use it), not part of the package.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

from symile_kernels.triton import _launch, cube, pair  # noqa: E402

KERNELS = {**cube.KERNELS, **pair.KERNELS}
# Per-block shared memory limits (opt-in maximum): sm_80 163 KiB, sm_90 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MODES = {  # name: (input pointer dtype, DOT_DTYPE, PRECISION)
    "fp32-ieee": ("*fp32", tl.float32, "ieee"),
    "tf32": ("*fp32", tl.float32, "tf32"),
    "bf16": ("*bf16", tl.bfloat16, None),
}
# Feature sizes compiled per bucket: (its largest, in every mode; sizes taking three or more segments,
# backward kernels in bf16).
BUCKET_D = {"small": (128, (112,)), "large": (256, (224, 240)), "xlarge": (512, (448, 496))}
_INTS = {"I", "J", "K", "D", "I_PER_SPLIT", "J_PER_SPLIT"}
_INPUTS = {"X", "Y", "Z", "A", "B"}


def cases() -> list:
    """(kernel, list name, config index, mode, d) for every GPU configuration list."""
    out = []
    for name, configs in _launch.kernel_configs().items():
        kernel, *rest = name.split("/")
        if rest == ["interpreter"]:
            continue
        largest, segmented = BUCKET_D[rest[1].removesuffix("-seg3")]
        sizes = [d for d in segmented if _launch.list_name(kernel, rest[0], d) == name]
        if name.endswith("-seg3"):  # a list for three or more segments: its sizes only
            largest, sizes = sizes[-1], sizes[:-1]
        for index in range(len(configs)):
            out += [(kernel, name, index, mode, largest) for mode in MODES]
            if "_bwd_" in kernel:  # where multi-segment accumulators raise register pressure
                out += [(kernel, name, index, "bf16", d) for d in sizes]
    return out


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in found.items()}


def compile_case(case: tuple) -> dict:
    """Compiles one case; returns its row (an "error" entry instead of raising)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, name, index, mode, d = case
    fn = KERNELS[kernel]
    arch, bucket = name.split("/")[1:]
    capability = 90 if arch == "sm90" else 80
    pointer, dot_dtype, precision = MODES[mode]
    config = _launch.kernel_configs()[name][index]
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = "i32" if p.name in _INTS else (pointer if p.name in _INPUTS else "*fp32")
    segments = _launch.d_segments(d)
    constexprs = dict(config.kwargs, SEGS=segments, PRECISION=precision, DOT_DTYPE=dot_dtype,
                      GRAD_DTYPE=dot_dtype, GRAD_PRECISION=precision, SHARE_SPREAD=60.0)
    constexprs = {k: v for k, v in constexprs.items() if signature.get(k) == "constexpr"}
    row = dict(kernel=kernel, list=name, index=index, mode=mode, capability=capability, d=d, segments=segments,
               warps=config.num_warps, stages=config.num_stages, blocks=dict(config.kwargs))
    # As a launch specialises them: tensors start 16-byte aligned, and D (the rows' stride) is a multiple
    # of 16 at every size compiled here (the loads vectorise; other d run unspecialised).
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if signature[p.name].startswith("*") or (p.name == "D" and d % 16 == 0)}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as e:  # reported, and failed by the test
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    row.update(_resources(compiled.asm["cubin"]), shared=int(compiled.metadata.shared),
               shared_limit=SHARED_LIMIT[capability], wgmma="wgmma.mma_async" in compiled.asm["ptx"])
    return row


def compile_all(jobs: int = 2) -> list:
    todo = cases()
    if jobs <= 1:
        return [compile_case(c) for c in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_case, todo))


def table(rows: list) -> str:
    lines = ["| kernel | list | config | mode | d | regs | stack (spill) | shared KiB | wgmma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = r["blocks"]
        shape = "x".join(str(v) for v in b.values()) + f" w{r['warps']} s{r['stages']}"
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['list']} | {shape} | {r['mode']} | {r['d']} | error: {r['error'][:80]} "
                         "| | | |")
            continue
        wgmma = ("yes" if r["wgmma"] else "no") if r["capability"] == 90 else "-"
        lines.append(f"| {r['kernel']} | {r['list']} | {shape} | {r['mode']} | {r['d']} | {r['reg']} | {r['stack']} "
                     f"| {r['shared'] / 1024:.0f} | {wgmma} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile every Triton kernel x config x precision")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--mode", choices=sorted(MODES), help="print this mode's rows only (all are compiled)")
    args = parser.parse_args(argv)
    print(table([r for r in compile_all(args.jobs) if args.mode in (None, r["mode"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
