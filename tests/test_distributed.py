"""Global-batch losses across processes (docs/math.md section 7), with gloo on the CPU.

Each spawned process checks, for every CPU backend, M in {2, 3, 4} and both
sampling modes: the mean over processes of the per-process losses equals the
single-process loss of the global batch, and the gradients of a small
DDP-wrapped encoder equal the single-process ones, float64, to 1e-10. A
one-process group must give exactly the non-distributed result. Then, in the
same processes, one rank at a time passes a different M, n, d or dtype: every
rank must get the same ValueError (no gloo abort, no hang), and a matching
call afterwards must still work.
"""
import copy
import datetime
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import symile_kernels
from symile_kernels import clip_loss, symile_loss

N_LOCAL, D_IN, D = 3, 5, 4
TOLERANCE = 1e-10
DEADLINE_S = 240  # a hung collective fails the test instead of hanging CI


class Encoders(torch.nn.Module):
    def __init__(self, M):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(D_IN, D, dtype=torch.float64) for _ in range(M))
        self.log_tau = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, features):
        return [torch.nn.functional.normalize(layer(f), dim=1) for layer, f in zip(self.layers, features)]


def _loss(loss_name, reps, tau, sampling, backend, gather):
    if loss_name == "clip":
        return clip_loss(reps, tau, backend=backend, gather=gather)
    return symile_loss(reps, tau, negative_sampling=sampling, backend=backend, gather=gather)


def _cases(backends):
    for backend in backends:
        for M in (2, 3, 4):
            for sampling in ("n_squared", "n"):
                yield backend, "symile", M, sampling
        yield backend, "clip", 3, "n_squared"


# Mismatch cases: what one rank passes instead of SAME, and how the message spells it.
SAME = dict(M=3, n=3, d=4, dtype=torch.float32)
MISMATCHES = {"dtype": (dict(dtype=torch.float64), "float64"), "M": (dict(M=2), "M=2"), "n": (dict(n=2), "n=2"),
              "d": (dict(d=5), "d=5")}


def _mismatch_cases(rank, world_size):
    """{case: what this rank's loss call raised} with one rank differing per case; "same": this
    rank's share of a matching call made afterwards."""
    found = {}

    def reps(M, n, d, dtype):
        return [torch.nn.functional.normalize(torch.randn(n, d, dtype=dtype), dim=1) for _ in range(M)]

    for number, (case, (change, _)) in enumerate(MISMATCHES.items()):
        shape = {**SAME, **(change if rank == (number + 1) % world_size else {})}
        for name, loss in (("symile", symile_loss), ("clip", clip_loss)):
            try:
                loss(reps(**shape), 2.0, backend="chunked", gather=True)
                found[f"{case} {name}"] = "no error"
            except ValueError as exc:
                found[f"{case} {name}"] = str(exc)
    found["same"] = float(symile_loss(reps(**SAME), 2.0, backend="chunked", gather=True))
    return found


def _worker(rank, world_size, port, result_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=DEADLINE_S))
    torch.set_num_threads(1)
    errors = []
    backends = [b for b in symile_kernels.available_backends("cpu")]
    for backend, loss_name, M, sampling in _cases(backends):
        torch.manual_seed(0)  # the same model and global batch on every process
        model = Encoders(M)
        features = [torch.randn(N_LOCAL * world_size, D_IN, dtype=torch.float64) for _ in range(M)]
        single = copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)

        torch.manual_seed(1)  # "n" draws its permutations of the global batch: same seed everywhere
        loss = _loss(loss_name, ddp([f[rows] for f in features]), ddp.module.log_tau.exp(), sampling, backend, True)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size

        torch.manual_seed(1)
        expected = _loss(loss_name, single(features), single.log_tau.exp(), sampling, backend, False)
        expected.backward()

        case = f"{backend} {loss_name} M={M} {sampling} world={world_size}"
        if world_size == 1:  # a one-process group is exactly the non-distributed computation
            if loss.item() != expected.item():
                errors.append(f"{case}: loss {loss.item()!r} != {expected.item()!r}")
        err = abs(mean_loss.item() - expected.item()) / abs(expected.item())
        if not err <= TOLERANCE:
            errors.append(f"{case}: loss relative error {err:.3g}")
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            err = float((p.grad - q.grad).norm() / q.grad.norm())
            if not err <= TOLERANCE:
                errors.append(f"{case}: gradient of {name} relative error {err:.3g}")
    mismatches = [None] * world_size
    dist.all_gather_object(mismatches, _mismatch_cases(rank, world_size) if world_size > 1 else {})
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"errors": errors, "backends": backends, "mismatches": mismatches}, f)
    # Every rank leaves together, then exits at once, running no destructors: tearing the
    # gloo group down at interpreter exit can deadlock (seen here: ~ProcessGroupGloo, reached
    # from DistributedDataParallel's reducer, joins a worker thread that waits for the GIL to
    # free a finished barrier's tensors) or abort a peer still inside a collective.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=(1, 2, 3))
def spawned(request, tmp_path_factory):
    """(world_size, rank 0's result) of ``_worker`` run once on world_size processes."""
    world_size = request.param
    result_path = tmp_path_factory.mktemp(f"world{world_size}") / "result.json"
    context = mp.start_processes(_worker, args=(world_size, _free_port(), str(result_path)), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=DEADLINE_S)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    return world_size, json.loads(result_path.read_text())


def test_global_batch_equals_single_process(spawned):
    _, result = spawned
    assert "chunked" in result["backends"] and "reference" in result["backends"]
    assert result["errors"] == []


def test_mismatch_is_the_same_value_error_on_every_rank(spawned):
    world_size, result = spawned
    if world_size == 1:
        pytest.skip("one process cannot disagree with itself")
    ranks = result["mismatches"]
    for case, (_, said) in MISMATCHES.items():
        for name in ("symile", "clip"):
            message = ranks[0][f"{case} {name}"]
            assert all(found[f"{case} {name}"] == message for found in ranks), (case, name)
            assert message.startswith("gather=True needs the same number of modalities M, local rows n, "
                                      "features d and dtype on every process; got rank 0: M="), message
            assert said in message and "M=3, n=3, d=4, float32" in message, message
    assert all(found["same"] > 0 for found in ranks)  # each rank's share of one finite loss


def test_gather_without_process_group_raises():
    assert not dist.is_initialized()
    reps = [torch.randn(4, 3) for _ in range(3)]
    with pytest.raises(RuntimeError, match="gather=True needs an initialised torch.distributed process group"):
        symile_loss(reps, 1.0, gather=True)
    with pytest.raises(RuntimeError, match="gather=True"):
        clip_loss(reps, 1.0, gather=True)
    with pytest.raises(TypeError, match="gather must be a bool"):
        symile_loss(reps, 1.0, gather="yes")
    with pytest.raises(ValueError, match="process_group is only used with gather=True"):
        symile_loss(reps, 1.0, process_group=object())
