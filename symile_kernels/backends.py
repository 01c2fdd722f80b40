"""The backend contract, the registry and dispatch.

A backend is an instance of a ``Backend`` subclass: four kernels over contiguous
tensors that share one device and dtype (``tau`` a 0-dim tensor of the compute
dtype on that device, docs/math.md section 1), and methods with defaults that
say where it runs and on what. docs/backends.md shows how to write one and
register it; ``symile_kernels.testing`` and tests/test_conformance.py check it.

The kernels (docs/math.md sections 2 and 3; no autograd, the ops in
``symile_kernels.ops`` hold it):

``cube_lse_forward(x, y, z, tau) -> (La, Lb, Lc)``
    x: (I, d), y: (J, d), z: (K, d); the cube may be rectangular (folded
    modalities for M > 3, local rows in distributed runs). La (I,), Lb (J,),
    Lc (K,): the log-sum-exps of the cube ``tau * T[i,j,k]`` over (j,k), (i,k)
    and (i,j), in float64 or the compute dtype (the op returns float64).
``cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs) -> (dx, dy, dz, dtau)``
    gLa (I,), gLb (J,), gLc (K,): incoming gradients; with
    ``G = gLa[i] e^(tau T - La[i]) + gLb[j] e^(tau T - Lb[j]) + gLc[k] e^(tau T - Lc[k])``
    the contractions of G: dx, dy, dz shaped like x, y, z, dtau 0-dim (no positive term).
    L and gL arrive in the compute dtype as a shift and a weight (docs/math.md section 6.4):
    use L only inside ``exp(S - L)`` and gL only as its multiplier.
``pair_lse_forward(a, b, pos, tau) -> L``
    a: (I, d), b: (J, d) with I <= J, pos: (I,). ``L[i] = LSE_j l[i, j]`` with
    ``l[i, j] = tau <a[i], b[j]>`` off the diagonal and ``l[i, i] = pos[i]``.
``pair_lse_backward(a, b, pos, tau, L, gL, needs) -> (da, db, dpos, dtau)``
    Gradients of ``sum_i gL[i] L[i]``.

``needs`` is four bools (dx, dy, dz, dtau, or da, db, dpos, dtau): which outputs
some input requires. A backend may return None for an output not needed and
skip its work; the op then returns it as an empty (0,) tensor.

The methods with defaults: ``unavailable_reason(device)`` (None: it runs there),
``row_dtype(dtype)`` (what rows of a dtype are computed in: bf16/fp16 become
float32 unless the backend takes them), ``for_dtype(dtype)`` (the backend that
runs inputs of that dtype: itself, or another one, as triton routes float64 to
chunked), and the optional fused pair forward ``pair_lse_forward_grads``
(``fuses_pair_forward()`` says whether it is there).

The built-in backends are loaded lazily from their modules: a module that fails
to import, or whose ``BACKEND.unavailable_reason(device)`` returns a message, is
not usable, and asking for it by name raises that message. ``register`` adds a
backend under its ``name``; ``register_module`` a module's ``BACKEND``, imported
on first use; ``unregister`` removes one that was added.

Example:
    >>> from symile_kernels import backends, chunked
    >>> class Mine(chunked.ChunkedBackend):
    ...     name = "mine"
    >>> backends.register(Mine())
    >>> symile_loss(reps, 14.3, backend="mine")
    >>> backends.unregister("mine")
"""
from __future__ import annotations

import abc
import importlib
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

# name -> module that defines ``BACKEND``. Only finished, tested kernels go here.
_BUILTIN = {
    "chunked": "symile_kernels.chunked",
    "triton": "symile_kernels.triton",
    "cuda": "symile_kernels.cuda",
    "cpu": "symile_kernels.cpu",
}

# Preference of ``backend="auto"`` per device type, fastest first.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "chunked"),
    "cpu": ("cpu", "chunked"),
}
_FALLBACK = "chunked"
ENV_VAR = "SYMILE_KERNELS_BACKEND"
# Every name a backend= argument may take; ``register`` and ``unregister`` update it.
_MODULES = dict(_BUILTIN)
NAMES = ("auto", "reference") + tuple(_MODULES)

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class Backend(abc.ABC):
    """One implementation of the cube and pair LSE kernels (module docstring): subclass it, set
    ``name``, implement the four kernels; override the other methods where the defaults do not fit."""

    name: str = ""
    description: str = ""

    @abc.abstractmethod
    def cube_lse_forward(self, x: Tensor, y: Tensor, z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ...

    @abc.abstractmethod
    def cube_lse_backward(self, x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                          gLa: Tensor, gLb: Tensor, gLc: Tensor,
                          needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
        ...

    @abc.abstractmethod
    def pair_lse_forward(self, a: Tensor, b: Tensor, pos: Tensor, tau: Tensor) -> Tensor:
        ...

    @abc.abstractmethod
    def pair_lse_backward(self, a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, gL: Tensor,
                          needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
        ...

    def pair_lse_forward_grads(self, a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, need_U: bool,
                               need_V: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Optional: the pair forward with the parts of its gradient that do not depend on gL
        (``symile_kernels.ops.pair_lse_fused``), run instead of ``pair_lse_forward`` when autograd will
        need gradients. Returns L as ``pair_lse_forward``'s, U (I, d) = P b and V (J, d) = P^T a with P
        the row softmax of the logits and its diagonal zeroed (each (0,) when not asked for), Pd (I,)
        its diagonal and rowdot (I,) float64, the rows' <a[i], U[i]> ((0,) without U)."""
        raise NotImplementedError(f"the {self.name!r} backend has no fused pair forward")

    def fuses_pair_forward(self) -> bool:
        """Whether ``pair_lse_forward_grads`` is implemented (overridden)."""
        return type(self).pair_lse_forward_grads is not Backend.pair_lse_forward_grads

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on ``device``, else why not and how to fix it."""
        return None

    def row_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype rows of ``dtype`` reach the kernels in: float32 and float64 as they are, bf16
        and fp16 cast to float32. A backend whose kernels take bf16/fp16 rows (products in that
        dtype, float32 accumulation, LSE vectors, tau and pos; gradients in the rows' dtype)
        returns ``dtype`` for them."""
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def for_dtype(self, dtype: torch.dtype) -> "Backend":
        """The backend whose kernels run rows of ``dtype``: this one, unless it routes a dtype its
        kernels lack to another backend (the registry, not the kernels, then runs that one)."""
        return self

    def __repr__(self) -> str:
        return f"<symile_kernels backend {self.name!r}>"


_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()


def register(backend: Backend, *, replace: bool = False) -> None:
    """Makes ``backend`` available as ``backend=backend.name`` everywhere (losses, ops, ``auto`` excluded).

    Raises TypeError for anything but a ``Backend``, ValueError for the reserved
    names "auto" and "reference", and for a name already in use unless ``replace``.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be an instance of a symile_kernels.backends.Backend subclass; "
                        f"got {type(backend).__name__}")
    _add(backend.name, None, replace)
    _loaded[backend.name] = backend


def register_module(name: str, module: str, *, replace: bool = False) -> None:
    """Like ``register``, for a backend defined as ``BACKEND`` in ``module``, imported on first use
    (an import error then makes it unavailable, with the error as the reason)."""
    if not isinstance(module, str):
        raise TypeError(f"module must be a module name (str); got {type(module).__name__}")
    _add(name, module, replace)


def unregister(name: str) -> None:
    """Removes a backend that ``register`` or ``register_module`` added; a built-in backend
    that was replaced comes back. Raises ValueError for a name nothing registered."""
    if name not in _MODULES or (name in _BUILTIN and _MODULES[name] == _BUILTIN[name]):
        raise ValueError(f"no backend {name!r} was registered (built-in backends cannot be removed)")
    _forget(name)
    if name in _BUILTIN:
        _MODULES[name] = _BUILTIN[name]
    else:
        del _MODULES[name]
    _refresh_names()


def _add(name: str, module: Optional[str], replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a backend's name must be a non-empty str; got {name!r}")
    if name in ("auto", "reference"):
        raise ValueError(f"backend name {name!r} is reserved")
    if name in _MODULES and not replace:
        raise ValueError(f"a backend named {name!r} is already registered; pass replace=True to replace it")
    _forget(name)
    _MODULES[name] = module
    _refresh_names()


def _forget(name: str) -> None:
    _loaded.pop(name, None)
    _load_errors.pop(name, None)


def _refresh_names() -> None:
    global NAMES
    NAMES = ("auto", "reference") + tuple(_MODULES)


def _load(name: str) -> Optional[Backend]:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors or _MODULES.get(name) is None:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a missing optional dependency or a failed build
        _load_errors[name] = f"importing {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "triton":
            _load_errors[name] += ("; install it with the package's extra, pip install 'symile_kernels[triton]' "
                                   "(Triton >= 3.6; the backend runs on CUDA GPUs, and on the CPU only "
                                   "through TRITON_INTERPRET=1 for tests)")
        return None
    _loaded[name] = module.BACKEND
    return module.BACKEND


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name == "reference":
        return None
    if name not in _MODULES:
        return f"unknown backend {name!r}; known: {', '.join(NAMES)}"
    backend = _load(name)
    if backend is None:
        return _load_errors[name]
    return backend.unavailable_reason(torch.device(device))


def available_backends(device: "torch.device | str | None" = None) -> list[str]:
    """Names of the backends that can run here.

    With ``device`` None, a backend counts when it runs on the CPU or on the
    current CUDA device (when there is one). "reference" (the oracle) is always
    listed last.
    """
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    names = [n for n in _MODULES if any(unavailable_reason(n, dev) is None for dev in devices)]
    return names + ["reference"]


def resolve(name: str, device: torch.device) -> str:
    """Turns a ``backend=`` argument (or "auto") into a backend name usable on ``device``.

    The environment variable SYMILE_KERNELS_BACKEND overrides "auto". An
    explicitly named backend that cannot run raises ValueError with the reason;
    "auto" falls back to "chunked" with a one-time warning when no faster
    backend suits the device.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        if name != "auto":
            return _require(name, device, source=f"environment variable {ENV_VAR}")
        order = _AUTO_ORDER.get(device.type, (_FALLBACK,))
        reasons = []
        for candidate in order:
            reason = unavailable_reason(candidate, device) if candidate in _MODULES else "not built in this version"
            if reason is None:
                if candidate == _FALLBACK and candidate != order[0]:
                    _warn_once(device.type, f"symile_kernels: no fused backend for {device.type} tensors "
                               f"({'; '.join(reasons)}); using the pure-PyTorch 'chunked' backend.")
                return candidate
            reasons.append(f"{candidate}: {reason}")
        raise RuntimeError(f"no backend can run on {device}: {'; '.join(reasons)}")
    return _require(name, device, source="backend")


def _require(name: str, device: torch.device, source: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, NAMES))}; got {name!r}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"{source}={name!r} cannot run on {device}: {reason}")
    return name


@torch.compiler.assume_constant_result
def resolve_for_loss(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, torch.dtype, bool]:
    """``resolve(name, device)``, the dtype rows of ``dtype`` are computed in there, and whether the
    backend that runs them fuses the pair forward with its gradient's parts ("reference": the
    rows' compute dtype, no fusion).

    torch.compile runs this eagerly while tracing and keeps the result as a constant:
    importing and building a backend cannot be traced, and the choice is a property of
    the process, not of the inputs. A compiled graph therefore keeps the backend it was
    traced with.
    """
    resolved = resolve(name, device)
    if resolved == "reference":
        return resolved, torch.float32 if dtype in _LOW_PRECISION else dtype, False
    backend = get(resolved)
    row_dtype = backend.row_dtype(dtype)
    return resolved, row_dtype, backend.for_dtype(row_dtype).fuses_pair_forward()


def get(name: str) -> Backend:
    """The loaded Backend object for a name that ``resolve`` returned."""
    backend = _load(name)
    if backend is None:
        raise ValueError(f"backend {name!r} is not available: {_load_errors.get(name, 'unknown backend')}")
    return backend


def kernels(name: str, dtype: torch.dtype) -> Backend:
    """The backend whose kernels run rows of ``dtype`` for backend ``name`` (``Backend.for_dtype``):
    what each op call looks up once."""
    return get(name).for_dtype(dtype)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
