"""symile_kernels: fused, memory-lean implementations of the Symile contrastive loss.

Public API: ``symile_loss``, ``Symile`` (drop-in for ``symile.Symile``),
``SymileLoss``, ``clip_loss``, ``MIPSimilarity``, ``mip_similarity`` and
``available_backends``; ``symile_kernels.backends.register`` adds a backend.
The math is in docs/math.md; ``symile_kernels.reference`` is the executable oracle.
"""
from . import ops  # registers the symile_kernels:: torch operators
from .backends import available_backends
from .loss import Symile, SymileLoss, clip_loss, symile_loss
from .similarity import MIPSimilarity, mip_similarity

__version__ = "0.1.0"

__all__ = ["Symile", "SymileLoss", "MIPSimilarity", "symile_loss", "clip_loss", "mip_similarity",
           "available_backends", "__version__"]
