"""Opening feature files, each format through its own library: one array per key.

``open_arrays(paths)`` returns ``{key: Array}`` for

- several ``.npy`` files, one array each, named by the file's stem:
  ``numpy.load(mmap_mode="r")`` maps them; the file must be exactly as long
  as its header says (a truncated file or one with bytes after the data is
  refused);
- one ``.npz`` (``numpy.savez`` or ``savez_compressed``): each member is read
  whole, when first used, by numpy's .npy reader from ``zipfile``, which
  decompresses it and checks its CRC-32; the member must hold exactly the
  data its header describes. numpy cannot map a zip member, so a member is
  in memory once read: prefer ``.npy`` or ``.safetensors`` for files larger
  than memory;
- one ``.safetensors``: the ``safetensors`` package (optional, in the
  ``train`` extra) checks the header (offsets inside the file, not
  overlapping, matching each shape) and reads rows lazily through
  ``safe_open(...).get_slice``;
- one torch ``.pt`` / ``.pth`` holding a dict of tensors (or of lists of split
  names): ``torch.load(weights_only=True, mmap=True)``, so nothing but
  tensors and plain containers is unpickled and the storage stays on disk.

Keys are data: any string key the format allows is kept as it is. Nothing
here checks what the arrays mean; ``features`` does that. Every error is one
``FeatureError`` naming the file (and key).
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".npy")
FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


class FeatureError(ValueError):
    """Bad feature input; the message names the file and key, ``option`` the
    command-line option to fix."""

    def __init__(self, message: str, option: str = "--features"):
        super().__init__(message)
        self.option = option


@dataclass
class Array:
    """One named array of a feature file, not read until asked.

    ``data`` is what the format's library gives: a ``np.memmap`` (.npy), an
    in-memory ``np.ndarray`` (.npz, after ``load``), a ``torch.Tensor`` on
    mapped storage (.pt), a ``_SafetensorsTensor`` (.safetensors) or a list of
    strings (split labels in a .pt file). Until ``load`` runs ``_loader`` it
    may be None (.npz).
    """

    source: str
    key: str
    data: object = None
    _loader: Optional[Callable[[], object]] = None

    @property
    def where(self) -> str:
        """'file' (a .npy: its stem is the key) or 'file', key 'k', for messages."""
        return repr(self.source) if self.source.endswith(".npy") else f"{self.source!r}, key {self.key!r}"

    def load(self):
        if self.data is None:
            self.data = self._loader()
        return self.data

    @property
    def shape(self):
        data = self.load()
        return (len(data),) if isinstance(data, list) else tuple(data.shape)

    @property
    def dtype_name(self) -> str:
        """'float32', 'bfloat16', 'int64', ... (numpy and torch spell them alike), or 'list'."""
        data = self.load()
        return "list" if isinstance(data, list) else str(data.dtype).replace("torch.", "")

    @property
    def is_float(self) -> bool:
        return self.dtype_name in FLOAT_DTYPES

    def rows(self, index) -> np.ndarray:
        """Rows ``index`` (a slice or an int64 array) as a new float32 numpy array."""
        block = self.load()[index]
        if isinstance(block, torch.Tensor):
            block = block.float().numpy()  # .float() widens bfloat16, which numpy lacks
        # A copy, always: callers own writable rows and the file is never written.
        return np.array(block, dtype=np.float32)

    def values(self) -> np.ndarray:
        """Every entry in its stored dtype (split labels); bfloat16, which numpy lacks, as float32."""
        data = self.load()
        if isinstance(data, (list, np.ndarray)):
            return np.asarray(data)
        block = data[:]
        return (block.float() if block.dtype == torch.bfloat16 else block).numpy()


class _SafetensorsTensor:
    """One tensor of an open safetensors file: its shape and dtype from the
    header, its rows read from the file when indexed by a slice or an int64
    array of row numbers (either gives a torch tensor)."""

    def __init__(self, handle, key: str):
        self._handle = handle  # keeps the file open for the slice
        self._slice = handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())
        # The dtype as torch sees it (an error here, naming the key, if it has none): zero rows read,
        # or the whole of a 0-d tensor, which a slice cannot index.
        self.dtype = (self._slice[0:0] if self.shape else handle.get_tensor(key)).dtype

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return self._slice[index]
        # Row numbers: one slice per run of consecutive rows (callers sort them), since the
        # package's slices take no index arrays in every version.
        index = np.asarray(index, dtype=np.int64)
        if not index.size:
            return self._slice[0:0]
        runs = np.split(index, np.flatnonzero(np.diff(index) != 1) + 1)
        return torch.cat([self._slice[int(run[0]):int(run[-1]) + 1] for run in runs])


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def open_arrays(paths: Sequence[str]) -> Dict[str, Array]:
    """``{key: Array}`` of one .npz / .safetensors / .pt file or of several .npy files (keys: stems)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise FeatureError("no feature file given")
    for path in paths:
        if not os.path.isfile(path):
            raise FeatureError(f"no such file {path!r}")
        if not path.endswith(SUFFIXES):
            raise FeatureError(f"{path!r}: unknown format; expected one of {', '.join(SUFFIXES)}")
    if len(paths) > 1 or paths[0].endswith(".npy"):
        multi = [p for p in paths if not p.endswith(".npy")]
        if multi:
            raise FeatureError(f"{multi[0]!r}: with several files every file must be a .npy holding one array")
        arrays: Dict[str, Array] = {}
        for path in paths:
            key = _stem(path)
            if key in arrays:
                raise FeatureError(f"{path!r}: two files give the key {key!r} (keys are the file names' stems)")
            arrays[key] = Array(path, key, _open_npy(path))
        return arrays
    path = paths[0]
    if path.endswith(".npz"):
        return _open_npz(path)
    if path.endswith(".safetensors"):
        return _open_safetensors(path)
    return _open_torch(path)


def _open_npy(path: str) -> np.memmap:
    with open(path, "rb") as f:
        shape, dtype = _npy_header(f, repr(path))
        held = os.path.getsize(path) - f.tell()
    _check_layout(repr(path), shape, dtype, held)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FeatureError(f"{path!r}: numpy cannot map it ({exc})") from None


def _npy_header(f, where: str):
    """(shape, dtype) from the .npy header at ``f``'s position, read by numpy's
    own header functions; ``f`` is left at the first data byte."""
    try:
        version = np.lib.format.read_magic(f)
        # Versions 2 and 3 differ only in the header's text encoding (latin-1, utf-8): the same for ASCII.
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except ValueError as exc:
        raise FeatureError(f"{where}: not a .npy array, or its header is damaged ({exc})") from None
    return shape, dtype


def _check_layout(where: str, shape, dtype: np.dtype, held: int) -> None:
    """Raises unless ``held``, the bytes after the header, are exactly the data the header describes."""
    if dtype.hasobject:
        raise FeatureError(f"{where}: holds Python objects (dtype {dtype}), which would need unpickling; "
                           f"object arrays are not features")
    needed = math.prod(shape) * dtype.itemsize
    if held != needed:
        problem = "truncated" if held < needed else "size mismatch"
        raise FeatureError(f"{where}: {problem}: its header describes a {shape} {dtype} array of {needed} bytes, "
                           f"but {held} bytes follow the header")


def _open_npz(path: str) -> Dict[str, Array]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise FeatureError(f"{path!r}: not a valid .npz (zip) file ({exc})") from None
    keys = [name[:-len(".npy")] for name in names if name.endswith(".npy")]
    if len(set(keys)) != len(keys):
        raise FeatureError(f"{path!r}: the zip archive holds a member twice")
    return {key: Array(path, key, _loader=lambda key=key: _read_npz_member(path, key)) for key in keys}


def _read_npz_member(path: str, key: str) -> np.ndarray:
    """Member ``key`` of the .npz ``path``, read whole by numpy's .npy reader
    (``np.load``'s own) through ``zipfile``, which decompresses it and checks
    its CRC-32 at the member's end. Its header is checked against the member's
    size first, so a header that claims more rows is refused before reading."""
    where = f"{path!r}, key {key!r}"
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(key + ".npy")
            with archive.open(info) as member:
                shape, dtype = _npy_header(member, where)
                _check_layout(where, shape, dtype, info.file_size - member.tell())
            with archive.open(info) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
                member.read()  # on to the end, where zipfile compares the CRC-32
    except FeatureError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise FeatureError(f"{where}: damaged zip member ({exc})") from None
    return array


def _open_safetensors(path: str) -> Dict[str, Array]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise FeatureError(f"{path!r}: reading .safetensors files needs the safetensors package: "
                           f"pip install safetensors (or pip install 'symile_kernels[train]')") from None
    try:
        handle = safe_open(path, framework="pt")
        keys = list(handle.keys())
    except Exception as exc:  # SafetensorError for every header the package refuses, OSError for the file
        raise FeatureError(f"{path!r}: not a valid safetensors file ({exc})") from None
    arrays = {}
    for key in keys:
        try:
            arrays[key] = Array(path, key, _SafetensorsTensor(handle, key))
        except Exception as exc:  # e.g. a dtype torch cannot hold
            raise FeatureError(f"{path!r}, key {key!r}: cannot be read ({exc})") from None
    return arrays


def _open_torch(path: str) -> Dict[str, Array]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a file it cannot read
        raise FeatureError(f"{path!r}: cannot be loaded as a torch file of tensors ({exc})") from None
    if not isinstance(loaded, dict):
        raise FeatureError(f"{path!r}: must hold a dict of tensors; got {type(loaded).__name__}")
    arrays = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise FeatureError(f"{path!r}: key {key!r} is a {type(key).__name__}; feature keys must be strings")
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            arrays[key] = Array(path, key, list(value))
        elif isinstance(value, torch.Tensor):
            arrays[key] = Array(path, key, value.detach())
        else:
            raise FeatureError(f"{path!r}, key {key!r}: must be a tensor (or a list of split names); "
                               f"got {type(value).__name__}")
    return arrays
