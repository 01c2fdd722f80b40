"""The CUDA backend's compiled extension on a GPU (the GPU suite runs these: ``pytest -m gpu``).

Against the float64 oracle at docs/math.md section 6's inputs and tolerances,
in every math mode; the raw ops' opcheck, argument checks and memory (the generic
battery, opcheck of the loss ops, torch.compile and determinism included, is
tests/test_conformance.py's). Skipped without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from symile_kernels import backends, symile_loss

from cuda_common import check_rectangular_pairs, gpu_only
from harness import check_against_oracle, make_inputs, relative_error


GPU_CUBE_CASES = [(N, d, tau, dtype) for N, d in ((1, 3), (2, 1), (7, 48), (33, 200), (129, 3), (130, 256))
                  for tau in (1.0, 100.0) for dtype in (torch.float64, torch.float32, torch.bfloat16)]
GPU_CUBE_CASES += [(N, d, 100.0, torch.float16) for N, d in ((7, 48), (130, 256))]


@gpu_only
@pytest.mark.parametrize("N,d,tau,dtype", GPU_CUBE_CASES, ids=str)
def test_gpu_cube_matches_oracle(N, d, tau, dtype):
    check_against_oracle("cuda", make_inputs("unit", 3, N, d), tau, dtype=dtype, device="cuda")


@gpu_only
@pytest.mark.parametrize("kind,tau", [("gaussian", 1.0), ("ties", 14.3), ("huge_row", 1.0), ("unit", 100.0)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_gpu_input_kinds(kind, tau, dtype):
    check_against_oracle("cuda", make_inputs(kind, 3, 67, 48), tau, dtype=dtype, device="cuda")


@gpu_only
@pytest.mark.parametrize("M,N,d", [(4, 5, 3), (4, 23, 48), (5, 9, 17)])
def test_gpu_rectangular_cube(M, N, d):
    check_against_oracle("cuda", make_inputs("unit", M, N, d), 14.3, dtype=torch.float32, device="cuda")


@gpu_only
@pytest.mark.parametrize("M,N,d", [(3, 33, 48), (2, 33, 5), (4, 7, 3), (3, 1025, 59), (2, 4097, 256)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_gpu_n_sampling_and_pairs(M, N, d, dtype):
    check_against_oracle("cuda", make_inputs("unit", M, N, d), 100.0, dtype=dtype, negative_sampling="n",
                         device="cuda", seed=7)


@gpu_only
def test_gpu_clip_loss():
    check_against_oracle("cuda", make_inputs("unit", 3, 65, 48), 14.3, loss="clip", device="cuda")


@gpu_only
@pytest.mark.parametrize("math,tolerance", [("tf32", "tf32"), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("N,d", [(33, 200), (130, 256)])
def test_gpu_tensor_core_modes(monkeypatch, math, tolerance, N, d):
    monkeypatch.setenv("SYMILE_KERNELS_CUDA_MATH", math)
    for tau in (1.0, 100.0):
        check_against_oracle("cuda", make_inputs("unit", 3, N, d), tau, dtype=torch.float32, tolerance=tolerance,
                             device="cuda")
    check_against_oracle("cuda", make_inputs("unit", 3, N, d), 100.0, dtype=torch.float32, tolerance=tolerance,
                         negative_sampling="n", device="cuda", seed=5)


@gpu_only
def test_gpu_tf32_follows_torch_flag(monkeypatch):
    import symile_kernels.cuda as cuda_backend

    monkeypatch.delenv(cuda_backend.MATH_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert cuda_backend.math_mode(torch.float32) == 1
    check_against_oracle("cuda", make_inputs("unit", 3, 33, 48), 14.3, dtype=torch.float32, tolerance="tf32",
                         device="cuda")


@gpu_only
def test_gpu_matches_chunked_at_larger_n():
    reps = [r.to("cuda", torch.float32) for r in make_inputs("unit", 3, 512, 256)]
    out, ref = [], []
    for backend, dest in (("cuda", out), ("chunked", ref)):
        inputs = [r.clone().requires_grad_() for r in reps]
        tau = torch.tensor(14.3, device="cuda", requires_grad=True)
        loss = symile_loss(inputs, tau, backend=backend)
        dest.extend([loss] + list(torch.autograd.grad(loss, inputs + [tau])))
    for a, b in zip(out, ref):
        assert relative_error(a, b) < 1e-4


@gpu_only
@pytest.mark.parametrize("I,J,d", [(5, 70, 3), (66, 131, 130), (1000, 4096, 256)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_gpu_rectangular_pairs_match_chunked(I, J, d, dtype):
    from symile_kernels.cuda import BACKEND

    check_rectangular_pairs(BACKEND.pair_lse_forward, BACKEND.pair_lse_backward, I, J, d, dtype,
                            1e-10 if dtype == torch.float64 else 1e-4, device="cuda")


@gpu_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_gpu_opcheck(dtype):
    import symile_kernels.cuda as cuda_backend

    assert cuda_backend.load_reason() is None
    ops = torch.ops.symile_kernels
    x, y, z = (torch.randn(n, 19, device="cuda", dtype=dtype) * 0.3 for n in (9, 11, 5))
    tau = torch.tensor(3.0, device="cuda", dtype=dtype)
    L64 = ops.cuda_cube_lse_forward(x, y, z, tau, 0)
    assert all(v.dtype == torch.float64 for v in L64)  # float64 LSEs whatever the compute dtype
    La, Lb, Lc = (v.to(dtype) for v in L64)  # the backward takes them in the compute dtype
    g = [torch.randn_like(v) for v in (La, Lb, Lc)]
    torch.library.opcheck(ops.cuda_cube_lse_forward, (x, y, z, tau, 0))
    torch.library.opcheck(ops.cuda_cube_lse_backward, (x, y, z, tau, La, Lb, Lc, *g, 0))
    a, b = (torch.randn(n, 19, device="cuda", dtype=dtype) * 0.3 for n in (13, 21))  # I < J: distributed rows
    pos = torch.randn(13, device="cuda", dtype=dtype)
    L = ops.cuda_pair_lse_forward(a, b, pos, tau, 0).to(dtype)
    torch.library.opcheck(ops.cuda_pair_lse_forward, (a, b, pos, tau, 0))
    torch.library.opcheck(ops.cuda_pair_lse_backward, (a, b, pos, tau, L, torch.randn_like(L), 0))
    # bf16 rows with float32 tau and LSE vectors.
    xb, yb, zb = (t.to(torch.bfloat16) for t in (x, y, z))
    tau32 = tau.float()
    torch.library.opcheck(ops.cuda_cube_lse_forward, (xb, yb, zb, tau32, 0))
    Lb16 = ops.cuda_cube_lse_forward(xb, yb, zb, tau32, 0)
    torch.library.opcheck(ops.cuda_cube_lse_backward, (xb, yb, zb, tau32, *(v.float() for v in Lb16),
                                                       *(v.float() for v in g), 0))


@gpu_only
def test_gpu_bad_input_names_the_tensor():
    import symile_kernels.cuda as cuda_backend

    assert cuda_backend.load_reason() is None
    ops = torch.ops.symile_kernels
    x = torch.randn(5, 8, device="cuda")
    tau = torch.tensor(1.0, device="cuda")
    with pytest.raises(RuntimeError, match="y must be on x's device"):
        ops.cuda_cube_lse_forward(x, x.cpu(), x, tau, 0)
    with pytest.raises(RuntimeError, match="z must be contiguous"):
        ops.cuda_cube_lse_forward(x, x, torch.randn(8, 5, device="cuda").t(), tau, 0)
    with pytest.raises(RuntimeError, match="tau must have dtype"):
        ops.cuda_cube_lse_forward(x, x, x, tau.double(), 0)
    with pytest.raises(RuntimeError, match="tau must have dtype"):  # bf16 rows take a float32 tau
        ops.cuda_cube_lse_forward(x.bfloat16(), x.bfloat16(), x.bfloat16(), tau.bfloat16(), 0)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        ops.cuda_cube_lse_forward(x, x, x, tau, 7)
    with pytest.raises(RuntimeError, match="needs float32 tensors"):
        ops.cuda_cube_lse_forward(x.double(), x.double(), x.double(), tau.double(), 1)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        ops.cuda_cube_lse_forward(x.int(), x.int(), x.int(), tau, 0)
    with pytest.raises(RuntimeError, match="pos must have 5 entries"):
        ops.cuda_pair_lse_forward(x, x, torch.zeros(4, device="cuda"), tau, 0)
    with pytest.raises(RuntimeError, match=r"b.size\(0\) \(J\) must be >= a.size\(0\)"):
        ops.cuda_pair_lse_forward(x, x[:3], torch.zeros(5, device="cuda"), tau, 0)


@gpu_only
def test_gpu_listed_and_big_batch_memory():
    assert "cuda" in backends.available_backends("cuda")
    # N = 2048, d = 256: extra memory is O(N) workspaces, far from any N^2 or N^3 buffer.
    reps = [torch.nn.functional.normalize(torch.randn(2048, 256, device="cuda"), dim=1).requires_grad_()
            for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = symile_loss(reps, 14.3, backend="cuda")
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert torch.cuda.max_memory_allocated() - base < 64 * 2 ** 20


@gpu_only
def test_gpu_huge_logits():
    # tests/test_numerics_edges.py's checks (issue 14 items 10 and 12c) on the GPU: float64 LSEs.
    from test_numerics_edges import check_cube_tie, check_n_sampling_norm_1e4, check_pair_tie

    check_cube_tie("cuda", "cuda")
    check_pair_tie("cuda", "cuda")
    check_n_sampling_norm_1e4("cuda", "cuda")
