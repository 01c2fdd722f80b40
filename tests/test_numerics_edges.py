"""float32 accuracy of the chunked backend where issue 14's reliability probe found defects:
dtau at small d (item 11), the drift of the running log-sum-exp over many tiles (item 12),
and ties at huge logits (item 10, not fixed yet: strict xfail)."""
import pytest
import torch

from oracle_check import check_against_oracle
from symile_kernels import chunked

OPS = torch.ops.symile_kernels


def test_dtau_small_d_item11():
    # N = 200, d = 2, M = 3, tau = 14.3, float32: dtau was 2.6e-4 off (float32 accumulation of <G, T>).
    g = torch.Generator().manual_seed(0)
    reps = [torch.randn(200, 2, dtype=torch.float64, generator=g) for _ in range(3)]
    errors = check_against_oracle("chunked", reps, 14.3, dtype=torch.float32)
    assert errors["dtau"] < 1e-4, errors


def _unit(n, d, g):
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)


def test_many_tiles_lse_does_not_drift_item12(monkeypatch):
    # One 1 x 1 tile per (i, j) pair: Lc combines 16384 partials. A float32 running logaddexp
    # left Lc 5.4e-5 off the float64 run of the same backend (La: 4.8e-6); float64 running sums: 4.7e-7.
    monkeypatch.setenv("SYMILE_KERNELS_CHUNK_BYTES", "1")
    assert chunked.tile_shape(128, 128, 128, 32, 4) == (1, 1)
    g = torch.Generator().manual_seed(0)
    x, y, z = (_unit(128, 32, g) for _ in range(3))
    L32 = chunked.cube_lse_forward(x.float(), y.float(), z.float(), torch.tensor(1.0))
    L64 = chunked.cube_lse_forward(x, y, z, torch.tensor(1.0, dtype=torch.float64))
    for name, a, b in zip(("La", "Lb", "Lc"), L32, L64):
        assert a.dtype == torch.float32
        err = float((a.double() - b).abs().max())
        assert err < 5e-6, (name, err)


def test_large_n_float32_against_float64_run(monkeypatch):
    # The loss and gradients in float32 against a float64 run of the same backend, many tiles.
    monkeypatch.setenv("SYMILE_KERNELS_CHUNK_BYTES", str(64 * 1024))
    g = torch.Generator().manual_seed(1)
    reps = [_unit(256, 32, g) for _ in range(3)]
    check_against_oracle("chunked", reps, 14.3, dtype=torch.float32)


@pytest.mark.xfail(strict=True, reason="issue 14 item 10: L = m + log(s) rounds log 2 away at logit 1e8, "
                   "so exp(S - L) sums to 2 over a tie; needs the running max and sum (or a two-float L) "
                   "saved for the backward, an operator interface change shared by every backend")
def test_tie_at_huge_logit_item10():
    # x[0] meets two (j, k) pairs at logit 1e8 (a tie) and the other two at -1e8. The exact
    # gradient of La[0] w.r.t. x[0] is the average of tau y_j z_k over the tie: 1e8.
    x = torch.tensor([[1.0], [1e-3]])
    y = torch.tensor([[1e4], [1e4]])
    z = torch.tensor([[1e4], [-1e4]])
    grads = []
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype).detach().requires_grad_()
        La, _, _ = OPS.cube_lse(xd, y.to(dtype), z.to(dtype), torch.tensor(1.0, dtype=dtype), "chunked")
        (dx,) = torch.autograd.grad(La[0], [xd])
        grads.append(dx[0, 0].item())
    assert grads[1] == pytest.approx(1e8, rel=1e-6)  # the float64 run gets the tie right
    assert grads[0] == pytest.approx(grads[1], rel=1e-4), grads  # float32 today: 2e8
