"""The synthetic data-generating processes the trainer learns from.

Every task produces a ``Split``: one float32 tensor per modality, all with N
rows, plus the integer ``labels`` of the modality to retrieve and its
``candidates`` (the inputs of every possible value of that modality). Data is
drawn from a ``torch.Generator`` seeded from ``(seed, split)``, so the test set
of a run can be drawn again, bit for bit, from its seed alone
(``--eval-only --checkpoint``).

Task ``xor`` (the Symile paper's synthetic binary XOR experiment)
------------------------------------------------------------------
Three modalities a, b, c, each a vector of ``d_v`` bits::

    a[j], b[j] ~ Bernoulli(1/2)             independently, j = 1..d_v
    i ~ Bernoulli(p_hat)                     one draw per sample
    c = a XOR b   if i = 1,   c = a   if i = 0

Bits are fed to the encoders as the floats 0.0 and 1.0. The zero-shot task is
to predict b among all ``2^d_v`` candidate bit vectors from (a, c); chance is
``2^-d_v``. At p_hat = 1, b = a XOR c is determined by (a, c) jointly while
being independent of a alone and of c alone: the information is purely
higher-order, so a pairwise (CLIP) model stays at chance and Symile can reach
1. At p_hat = 0, c = a and b is independent of (a, c): nobody beats chance.
In between, the best possible accuracy is ``p_hat + (1 - p_hat) 2^-d_v``.
Candidate k is the bit vector of the integer k (least significant bit first).

Task ``m3-synthetic`` (a stand-in for Symile-M3's structure)
-----------------------------------------------------------
``C`` classes, each with a fixed random class vector ``v_y ~ N(0, I_{d_c})``
(``d_c = class_dim``), and ``w`` "languages". Per sample::

    y_1, ..., y_w ~ Uniform{0..C-1}         one class "spoken" in each language
    l ~ Uniform{0..w-1}                      the language the text names
    audio = [v_{y_1}, ..., v_{y_w}] + noise * eps      (w * d_c floats)
    text  = onehot(l)                                  (w floats)
    image = v_{y_l} + noise * eps'                     (d_c floats)

with eps, eps' standard normal. The task retrieves the image's class among
all C candidates (the clean class vectors) from (audio, text); chance is 1/C.
Pairwise scores cannot do better than about 1/w: the text alone says nothing
about the class (l and y_l are independent), and the audio alone narrows the
class down to its w slots without saying which. Only the triple interaction
(the language selects the slot) identifies the class, which the MIP can
express: the text representation gates the dimensions that carry slot l.

Missing modalities
------------------
``hide`` replaces each modality of each sample, with probability q, by a
neutral fill (the modality's mean: 0.5 for bits, 0 for the Gaussian
features, 1/w for the one-hot language) and returns the 0/1 "missing" indicator per
sample and modality; the encoders receive the indicator as an extra input
(``model.Encoders``), as in the Symile paper's missing-data experiments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

# "features" reads the user's own embeddings from files: see ``features``.
TASKS = ("xor", "m3-synthetic", "features")

# Stream ids mixed into the seed: each split (and the class table) gets its own
# generator, so changing train_n does not change the test set.
_STREAMS = {"train": 1, "test": 2, "classes": 3, "train-missing": 4, "test-missing": 5, "split": 6,
            "val-missing": 7}


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for ``(seed, stream)``; independent across streams."""
    state = np.random.SeedSequence([int(seed), _STREAMS[stream]]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@dataclass
class Split:
    """One data split.

    inputs: modality name -> (N, F_m) float32 tensor of encoder inputs.
    missing: modality name -> (N,) float32 0/1 indicator (1 = hidden).
    labels: (N,) int64 index of the target modality's value among ``candidates``.
    candidates: (K, F_target) float32 inputs of every candidate value.
    target: name of the modality to retrieve; queries: the other modalities.
    fill: modality name -> neutral value a hidden entry is replaced by.
    """

    inputs: Dict[str, Tensor]
    missing: Dict[str, Tensor]
    labels: Tensor
    candidates: Tensor
    target: str
    queries: List[str]
    fill: Dict[str, float]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, index: Tensor) -> Dict[str, Dict[str, Tensor]]:
        """Rows ``index`` as ``{"inputs": {m: (B, F_m)}, "missing": {m: (B,)}}``."""
        return {"inputs": {m: v[index] for m, v in self.inputs.items()},
                "missing": {m: v[index] for m, v in self.missing.items()}}


def _bits(n_vectors: int, d_v: int) -> Tensor:
    """All 2^d_v bit vectors, row k holding the bits of k (least significant first): (2^d_v, d_v)."""
    k = torch.arange(n_vectors)[:, None]
    return ((k >> torch.arange(d_v)[None, :]) & 1).to(torch.float32)


def _labels_of_bits(bits: Tensor) -> Tensor:
    return (bits.to(torch.int64) << torch.arange(bits.shape[1])[None, :]).sum(dim=1)


def xor_split(n: int, d_v: int, p_hat: float, gen: torch.Generator) -> Split:
    """n samples of the ``xor`` task (module docstring); target b, queries (a, c)."""
    a = torch.randint(0, 2, (n, d_v), generator=gen)
    b = torch.randint(0, 2, (n, d_v), generator=gen)
    i = torch.rand(n, 1, generator=gen) < p_hat
    c = torch.where(i, a ^ b, a)
    inputs = {"a": a.float(), "b": b.float(), "c": c.float()}
    return Split(inputs=inputs, missing={m: torch.zeros(n) for m in inputs}, labels=_labels_of_bits(b),
                 candidates=_bits(2 ** d_v, d_v), target="b", queries=["a", "c"],
                 fill={"a": 0.5, "b": 0.5, "c": 0.5})


def class_vectors(classes: int, class_dim: int, seed: int) -> Tensor:
    """The fixed (C, d_c) class table of ``m3-synthetic`` for ``seed``."""
    return torch.randn(classes, class_dim, generator=generator(seed, "classes"))


def m3_split(n: int, w: int, noise: float, table: Tensor, gen: torch.Generator) -> Split:
    """n samples of ``m3-synthetic`` (module docstring); target image, queries (audio, text)."""
    classes, class_dim = table.shape
    y = torch.randint(0, classes, (n, w), generator=gen)
    lang = torch.randint(0, w, (n,), generator=gen)
    audio = table[y].reshape(n, w * class_dim) + noise * torch.randn(n, w * class_dim, generator=gen)
    text = torch.nn.functional.one_hot(lang, w).float()
    label = y.gather(1, lang[:, None]).squeeze(1)
    image = table[label] + noise * torch.randn(n, class_dim, generator=gen)
    inputs = {"audio": audio, "text": text, "image": image}
    return Split(inputs=inputs, missing={m: torch.zeros(n) for m in inputs}, labels=label,
                 candidates=table.clone(), target="image", queries=["audio", "text"],
                 fill={"audio": 0.0, "text": 1.0 / w, "image": 0.0})


def draw_hidden(n: int, q: float, gen: torch.Generator) -> Tensor:
    """(n,) bool: which of n samples to hide, each with probability q (one draw per sample)."""
    return torch.rand(n, generator=gen) < q


def hide(split: Split, q: float, gen: torch.Generator, modalities: Optional[List[str]] = None) -> Split:
    """Hides each listed modality (default: all) of each sample with probability q.

    Hidden entries are replaced by the modality's neutral fill and flagged in
    ``missing``; returns a new Split (the input is not modified).
    """
    if q <= 0:
        return split
    inputs, missing = dict(split.inputs), dict(split.missing)
    for m in (modalities if modalities is not None else list(split.inputs)):
        hidden = draw_hidden(len(split), q, gen)
        inputs[m] = torch.where(hidden[:, None], torch.full_like(inputs[m], split.fill[m]), inputs[m])
        missing[m] = torch.maximum(missing[m], hidden.float())
    return Split(inputs=inputs, missing=missing, labels=split.labels, candidates=split.candidates,
                 target=split.target, queries=split.queries, fill=split.fill)


def input_sizes(task: str, d_v: int = 2, w: int = 4, class_dim: int = 32) -> Dict[str, int]:
    """Modality name -> number of input features (before the missing indicator), in loss order."""
    if task == "xor":
        return {"a": d_v, "b": d_v, "c": d_v}
    return {"audio": w * class_dim, "text": w, "image": class_dim}
