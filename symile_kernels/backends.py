"""Backend registry and dispatch.

A backend supplies four plain functions (no autograd) over contiguous
tensors that share one device and dtype; ``tau`` is a 0-dim tensor of the
compute dtype on that device (docs/math.md section 1). The rows are float32 or
float64, or bf16/fp16 for a backend with ``accepts_low_precision`` (tau, the
LSE vectors and pos are then float32):

``cube_lse_forward(x, y, z, tau) -> (La, Lb, Lc)``
    x: (I, d), y: (J, d), z: (K, d); the cube may be rectangular (folded
    modalities for M > 3, local rows in distributed runs). Returns the log-sum-exp
    vectors La (I,), Lb (J,), Lc (K,) of the cube ``tau * T[i,j,k]`` reduced over
    (j,k), (i,k) and (i,j) (docs/math.md section 2).
``cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc) -> (dx, dy, dz, dtau)``
    gLa (I,), gLb (J,), gLc (K,): incoming gradients of La, Lb, Lc. With
    ``G = gLa[i] e^(tau T - La[i]) + gLb[j] e^(tau T - Lb[j]) + gLc[k] e^(tau T - Lc[k])``
    returns docs/math.md section 2's contractions of G: dx, dy, dz shaped like x, y, z
    and dtau (0-dim). The positive term of G is not included (it is plain torch).
``pair_lse_forward(a, b, pos, tau) -> L``
    a: (I, d), b: (J, d) with I <= J, pos: (I,). ``L[i] = LSE_j l[i, j]`` over the
    J columns, with ``l[i, j] = tau <a[i], b[j]>`` off the diagonal and
    ``l[i, i] = pos[i]`` (docs/math.md section 3; CLIP when ``pos[i] = tau <a[i], b[i]>``).
    I < J happens in distributed runs: a process's local rows against the global
    batch, rotated so that each row's positive column is its own index.
``pair_lse_backward(a, b, pos, tau, L, gL) -> (da, db, dpos, dtau)``
    Gradients of ``sum_i gL[i] L[i]``.

A backend with ``skips_unneeded_grads`` also takes ``needs=(bool, bool, bool, bool)``
by keyword in both backward functions (which of dx, dy, dz, dtau, or da, db, dpos,
dtau, some input requires) and may return None for the others.

The built-in backends are loaded lazily from their modules: a module that fails
to import, or whose ``BACKEND.unavailable_reason(device)`` returns a message, is
not usable, and asking for it by name raises that message. ``register`` adds a
backend (a ``Backend`` record, or ``register_module`` for a lazily imported
module) under its name; ``unregister`` removes one that was added.

Example:
    >>> from symile_kernels import backends, chunked
    >>> mine = dataclasses.replace(chunked.BACKEND, name="mine")
    >>> backends.register(mine)
    >>> symile_loss(reps, 14.3, backend="mine")
    >>> backends.unregister("mine")
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch

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


# The four functions every backend provides (module docstring).
KERNELS = ("cube_lse_forward", "cube_lse_backward", "pair_lse_forward", "pair_lse_backward")


@dataclass
class Backend:
    """One implementation of the cube and pair LSE kernels (see module docstring)."""

    name: str
    cube_lse_forward: Callable
    cube_lse_backward: Callable
    pair_lse_forward: Callable
    pair_lse_backward: Callable
    # Returns None when the backend can run on ``device``, else why not and how to fix it.
    unavailable_reason: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)
    description: str = ""
    # True when the four functions also take bf16/fp16 x, y, z (a, b) with float32
    # tau and pos: products in that dtype, float32 accumulation and LSE vectors,
    # gradients in the input dtype. Otherwise such inputs are upcast to float32 first.
    accepts_low_precision: bool = False
    # The name of the backend that runs float64 inputs instead of this one (for a backend
    # whose kernels have no float64 path); the registry, not the backend, routes them.
    float64_route: Optional[str] = None
    # True when both backward functions take ``needs=`` and skip the outputs no input needs
    # (module docstring); otherwise every output is computed and the unneeded ones dropped.
    skips_unneeded_grads: bool = False
    # Optional: ``pair_lse_forward_grads(a, b, pos, tau, need_U, need_V) -> (L, U, V, Pd, rowdot)``,
    # the pair forward together with the parts of its gradient that do not depend on gL
    # (``symile_kernels.ops.pair_lse_fused``), run instead of ``pair_lse_forward`` when autograd
    # will need gradients. U (I, d) = P b and V (J, d) = P^T a with P the row softmax of the logits
    # and its diagonal zeroed (each (0,) when not asked for), Pd (I,) its diagonal, rowdot (I,)
    # float64 the rows' <a[i], U[i]>; L as ``pair_lse_forward``'s.
    pair_lse_forward_grads: Optional[Callable] = None

    @classmethod
    def from_namespace(cls, name: str, namespace: Any, **fields: Any) -> "Backend":
        """The record whose four kernel functions (``KERNELS``) are the same-named entries
        of ``namespace``: a mapping such as a module's ``globals()``, or any object's
        attributes. ``fields`` sets the other fields."""
        get = namespace.__getitem__ if isinstance(namespace, Mapping) else partial(getattr, namespace)
        return cls(name=name, **{kernel: get(kernel) for kernel in KERNELS}, **fields)


def forward_grads_like(a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, need_U: bool,
                       need_V: bool) -> tuple[torch.Tensor, ...]:
    """Empty outputs of ``pair_lse_forward_grads`` with their shapes and dtypes (fake kernels)."""
    f64 = dict(dtype=torch.float64, device=a.device)
    return (a.new_empty(a.shape[0], **f64), torch.empty_like(a) if need_U else a.new_empty(0),
            torch.empty_like(b) if need_V else b.new_empty(0), torch.empty_like(pos),
            a.new_empty(a.shape[0] if need_U else 0, **f64))


_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()


def register(backend: Backend, *, replace: bool = False) -> None:
    """Makes ``backend`` available as ``backend=backend.name`` everywhere (losses, ops, ``auto`` excluded).

    Raises TypeError for anything but a ``Backend``, ValueError for the reserved
    names "auto" and "reference", and for a name already in use unless ``replace``.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a symile_kernels.backends.Backend; got {type(backend).__name__}")
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
def resolve_for_loss(name: str, device: torch.device) -> tuple[str, bool]:
    """``resolve(name, device)`` and whether that backend ``accepts_low_precision``
    (False for "reference").

    torch.compile runs this eagerly while tracing and keeps the result as a
    constant: importing and building a backend cannot be traced, and the choice
    is a property of the process, not of the inputs. A compiled graph therefore
    keeps the backend it was traced with.
    """
    resolved = resolve(name, device)
    return resolved, resolved != "reference" and get(resolved).accepts_low_precision


def get(name: str) -> Backend:
    """The loaded Backend object for a name that ``resolve`` returned."""
    backend = _load(name)
    if backend is None:
        raise ValueError(f"backend {name!r} is not available: {_load_errors.get(name, 'unknown backend')}")
    return backend


def for_dtype(name: str, dtype: torch.dtype) -> Backend:
    """The Backend that runs backend ``name`` on inputs of ``dtype``: its ``float64_route``
    for float64 inputs when it names one, else the backend itself."""
    backend = get(name)
    if dtype == torch.float64 and backend.float64_route is not None:
        return get(backend.float64_route)
    return backend


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
