"""Counts the work one forward+backward of the Symile loss executes, per backend and pass.

For ``triton`` the loss runs on CPU tensors in Triton's interpreter, with the
interpreter's ``tl.dot`` and ``tl.exp``/``tl.exp2`` wrapped: every ``tl.dot``
of (M, K) by (K, N) adds 2 M N K FLOPs, every element passed to an
exponential adds one exponential. Exponentials are split into those on
two-dimensional tiles (one per tile element: the cost docs/math.md section 5
bounds) and those on row or column vectors (per-row/per-column factors,
O(1 / tile side) of the first). The script prints, per pass, executed FLOPs
over the model FLOPs of ``timing.model_flops`` (2 N^3 d
forward and 4 N^3 d backward for the cube; 2 and 4 M N^2 d for pair losses)
and exponentials per logit element (N^3 for the cube, M N^2 for pair losses).

Backends report through ``COUNTERS``: a function ``(loss, M, N, d) ->
{pass: {"flops", "exp_tile", "exp_vector", "kernels"}}`` per backend. The
cuda backend reports the M = 3 cube through its CPU emulation (``count_work_cuda.py``).

Usage:
    python benchmarks/count_work.py --N 128 --d 64 256 [--loss symile n clip] [--arch sm90|sm80|interpreter]
        [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import defaultdict

# The Triton kernels read TRITON_INTERPRET when they are decorated, i.e. at import.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from symile_kernels import clip_loss, symile_loss  # noqa: E402
from timing import model_flops  # noqa: E402


class _Tally:
    """Per-kernel counts of the current pass."""

    def __init__(self):
        self.kernel = "(outside kernels)"
        self.counts = defaultdict(lambda: defaultdict(int))

    def add(self, key: str, amount: int) -> None:
        self.counts[self.kernel][key] += int(amount)

    def totals(self) -> dict:
        out = dict(flops=0, exp_tile=0, exp_vector=0, launches=0, programs=0)
        for per in self.counts.values():
            for key, value in per.items():
                out[key] += value
        out["kernels"] = {name: dict(per) for name, per in self.counts.items()}
        return out


@contextlib.contextmanager
def triton_interpreter_counters():
    """Yields a function ``start() -> _Tally`` that begins a new pass; while active, the
    interpreter's dot, exp and exp2 and each kernel launch are counted into the latest tally."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    saved = dict(create_dot=builder.create_dot, create_exp=builder.create_exp,
                 create_exp2=builder.create_exp2, call=interpreter.GridExecutor.__call__)
    state = {"tally": _Tally()}

    def exp_counter(original):
        def counted(self, arg):
            size = arg.data.size
            state["tally"].add("exp_tile" if arg.data.ndim >= 2 else "exp_vector", size)
            return original(self, arg)
        return counted

    def counted_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        batch = a.data.size // (m * k)
        state["tally"].add("flops", 2 * batch * m * n * k)
        return saved["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def counted_call(self, *args, **kwargs):
        tally = state["tally"]
        previous, tally.kernel = tally.kernel, self.fn.__name__
        grid = self.grid if isinstance(self.grid, tuple) else (self.grid,)
        programs = 1
        for g in grid:
            programs *= int(g)
        tally.add("launches", 1)
        tally.add("programs", programs)
        try:
            return saved["call"](self, *args, **kwargs)
        finally:
            tally.kernel = previous

    builder.create_dot = counted_dot
    builder.create_exp = exp_counter(saved["create_exp"])
    builder.create_exp2 = exp_counter(saved["create_exp2"])
    interpreter.GridExecutor.__call__ = counted_call

    def start() -> _Tally:
        state["tally"] = _Tally()
        return state["tally"]

    try:
        yield start
    finally:
        builder.create_dot = saved["create_dot"]
        builder.create_exp = saved["create_exp"]
        builder.create_exp2 = saved["create_exp2"]
        interpreter.GridExecutor.__call__ = saved["call"]


def _inputs(M: int, N: int, d: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1).requires_grad_()
            for _ in range(M)]


def _run_loss(loss: str, backend: str, reps: list, tau: torch.Tensor) -> torch.Tensor:
    if loss == "clip":
        return clip_loss(reps[:2], tau, backend=backend)
    return symile_loss(reps, tau, negative_sampling="n" if loss == "n" else "n_squared", backend=backend)


def gpu_tile_shapes(arch: str) -> contextlib.AbstractContextManager:
    """Within the block the interpreter launches every Triton kernel from ``arch``'s ("sm90" or
    "sm80") lists, untuned, so that it runs the GPU's tile shapes (each list's first configuration,
    the one an untuned launch takes); "interpreter" changes nothing."""
    if arch == "interpreter":
        return contextlib.nullcontext()
    from symile_kernels.triton import interpret_as

    return interpret_as(arch)


def count_triton(loss: str, M: int, N: int, d: int, arch: str = "sm90") -> dict:
    """{"forward": counts, "backward": counts} of one forward+backward on the triton backend
    (interpreter, with the tile shapes of ``arch``'s first configurations); counts: flops,
    exp_tile, exp_vector, launches, programs, kernels (per-kernel counts)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_triton needs TRITON_INTERPRET=1 before symile_kernels.triton is imported")
    reps = _inputs(M, N, d)
    tau = torch.tensor(14.3, requires_grad=True)
    with gpu_tile_shapes(arch), triton_interpreter_counters() as start:
        forward = start()
        value = _run_loss(loss, "triton", reps, tau)
        backward = start()
        value.backward()
    return {"forward": forward.totals(), "backward": backward.totals()}


def count_cuda(loss: str, M: int, N: int, d: int, arch: str = "sm90", mode: str = "bf16") -> dict:
    """{"forward": counts, "backward": counts} of one cube forward+backward of the cuda backend's
    kernels run through its CPU emulation (``count_work_cuda.py``; float32 rows in ``mode`` tiles).
    The emulation counts every ``mma_sync`` (2 m n k FLOPs, plus SIMT FMAs) and every ``exp_``
    (per element, "exp_tile") and ``vexp_`` (per row, column or partial, "exp_vector"). Only the
    M = 3 cube is counted; ``arch`` does not apply (the emulation plans for a generic device)."""
    if loss != "symile" or M != 3:
        raise NotImplementedError("cuda: counters cover the M = 3 cube only")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from count_work_cuda import cuda_work_counts

    result = cuda_work_counts(N, d, mode=mode)
    out = {}
    for name in ("forward", "backward"):
        rows = [r for r in result["passes"] if r["pass"] == name]
        out[name] = dict(flops=sum(r["flops"] for r in rows), exp_tile=sum(r["exps"] for r in rows),
                         exp_vector=sum(r["vexps"] for r in rows), launches=len(rows), programs=None,
                         kernels={r["kernel"]: {k: r[k] for k in ("flops", "exps", "vexps")} for r in rows})
    return out


COUNTERS = {"triton": count_triton, "cuda": count_cuda}


def shape(loss: str, M: int) -> tuple:
    """(M, sampling) of the model for ``loss``."""
    if loss == "clip":
        return 2, "n"
    return M, ("n" if loss == "n" else "n_squared")


def ratios(loss: str, M: int, N: int, d: int, counts: dict) -> dict:
    """Executed / model FLOPs and exponentials per logit element, per pass and in total."""
    M_model, sampling = shape(loss, M)
    fwd_model = model_flops(M_model, N, d, sampling, backward=False)
    model = {"forward": fwd_model, "backward": model_flops(M_model, N, d, sampling, backward=True) - fwd_model}
    elements = fwd_model / (2 * d)
    out = {}
    for name in ("forward", "backward"):
        c = counts[name]
        out[name] = dict(flops=c["flops"] / model[name], exp_tile=c["exp_tile"] / elements,
                         exp_all=(c["exp_tile"] + c["exp_vector"]) / elements)
    total_flops = counts["forward"]["flops"] + counts["backward"]["flops"]
    out["total"] = dict(flops=total_flops / (model["forward"] + model["backward"]),
                        exp_tile=out["forward"]["exp_tile"] + out["backward"]["exp_tile"],
                        exp_all=out["forward"]["exp_all"] + out["backward"]["exp_all"])
    return out


def table(rows: list) -> str:
    lines = ["| backend | loss | M | N | d | FLOPs fwd | FLOPs bwd | FLOPs total | exp/elem fwd | exp/elem bwd "
             "| exp/elem total | (of which tile) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['backend']} | {r['loss']} | {r['M']} | {r['N']} | {r['d']} | {r['status']} "
                         "| | | | | | |")
            continue
        q = r["ratios"]
        lines.append(f"| {r['backend']} | {r['loss']} | {r['M']} | {r['N']} | {r['d']} | {q['forward']['flops']:.2f} "
                     f"| {q['backward']['flops']:.2f} | {q['total']['flops']:.2f} | {q['forward']['exp_all']:.2f} "
                     f"| {q['backward']['exp_all']:.2f} | {q['total']['exp_all']:.2f} | {q['total']['exp_tile']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=sorted(COUNTERS))
    parser.add_argument("--loss", nargs="+", default=["symile"], choices=["symile", "n", "clip"])
    parser.add_argument("--M", type=int, default=3)
    parser.add_argument("--N", type=int, nargs="+", default=[64])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--arch", default="sm90", choices=["sm90", "sm80", "interpreter"],
                        help="tile shapes: the first configuration of this GPU list (default sm90), or the "
                             "interpreter's small default")
    parser.add_argument("--json", help="also write the rows (with per-kernel counts) to this file")
    args = parser.parse_args(argv)
    rows = []
    for backend in args.backends:
        for loss in args.loss:
            M = 2 if loss == "clip" else args.M
            for N in args.N:
                for d in args.d:
                    row = dict(backend=backend, loss=loss, M=M, N=N, d=d)
                    try:
                        counts = COUNTERS[backend](loss, M, N, d, args.arch)
                    except NotImplementedError as e:
                        row["status"] = str(e)
                        print(str(e), file=sys.stderr)
                    else:
                        row.update(status="ok", counts=counts, ratios=ratios(loss, M, N, d, counts))
                    rows.append(row)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
