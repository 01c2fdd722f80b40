"""Opening feature files without reading them: one lazy array per key.

``open_arrays(paths)`` returns ``{key: Array}`` for

- one ``.npz`` (``numpy.savez``): members stored uncompressed are
  memory-mapped where they lie inside the zip; members of a compressed file
  (``numpy.savez_compressed``) cannot be mapped and are read into memory,
  one key at a time, when first used;
- one ``.safetensors``: every tensor is memory-mapped from the file's header
  (the format is a little-endian u64 header length, a JSON header, then raw
  row-major data), so the ``safetensors`` package is not needed;
- one torch ``.pt`` holding a dict of tensors: loaded with ``mmap=True``
  (torch's zip format; the tensors' storage stays on disk);
- several ``.npy`` files, one array each, named by the file's stem and mapped
  with ``numpy.load(mmap_mode="r")``.

Nothing here checks what the arrays mean; ``features`` does that. Errors are
``FeatureError`` naming the file (and key).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".npy")
# safetensors dtype names -> numpy dtypes; BF16 is read as its 16 raw bits.
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4",
                       "U64": "<u8"}


class FeatureError(ValueError):
    """Bad feature input; the message names the file and key, ``option`` the
    command-line option to fix."""

    def __init__(self, message: str, option: str = "--features"):
        super().__init__(message)
        self.option = option


@dataclass
class Array:
    """One named array of a feature file, not read until asked.

    ``data`` is a numpy array (often a ``np.memmap``), a list of strings (split
    labels in a .pt file) or None until ``load`` is called (compressed .npz).
    ``bfloat16`` marks 16-bit raw words to be widened to float32 on read.
    """

    source: str
    key: str
    data: object = None
    bfloat16: bool = False
    _loader: Optional[object] = None

    @property
    def where(self) -> str:
        """'file' or 'file', key 'k' for messages."""
        return f"{self.source!r}, key {self.key!r}" if self.key != _stem(self.source) else repr(self.source)

    def load(self):
        if self.data is None:
            self.data = self._loader()
        return self.data

    @property
    def shape(self):
        data = self.load()
        return (len(data),) if isinstance(data, list) else tuple(data.shape)

    @property
    def is_float(self) -> bool:
        data = self.load()
        return self.bfloat16 or (isinstance(data, np.ndarray) and data.dtype.kind == "f")

    @property
    def dtype_name(self) -> str:
        data = self.load()
        if self.bfloat16:
            return "bfloat16"
        return "list" if isinstance(data, list) else str(data.dtype)

    def rows(self, index) -> np.ndarray:
        """Rows ``index`` (a slice or an int64 array) as a float32 numpy array."""
        block = self.load()[index]
        if self.bfloat16:
            return (np.asarray(block).astype(np.uint32) << 16).view(np.float32)
        # A slice is a view of the (read-only) map: copy it, so callers own writable rows.
        return np.array(block, dtype=np.float32) if isinstance(index, slice) else np.asarray(block, np.float32)


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
            arrays[key] = Array(path, key, _load_npy(path))
        return arrays
    path = paths[0]
    if path.endswith(".npz"):
        return _open_npz(path)
    if path.endswith(".safetensors"):
        return _open_safetensors(path)
    return _open_torch(path)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: refuse them
        raise FeatureError(f"{path!r}: cannot be memory-mapped ({exc}); object arrays are not features") from None


def _open_npz(path: str) -> Dict[str, Array]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise FeatureError(f"{path!r}: not a valid .npz (zip) file") from None
    arrays = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            mapped = _map_npz_member(path, info) if info.compress_type == zipfile.ZIP_STORED else None
            loader = (lambda key=key: _read_npz_member(path, key))
            arrays[key] = Array(path, key, mapped, _loader=loader)
    return arrays


def _read_npz_member(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except ValueError as exc:
        raise FeatureError(f"{path!r}, key {key!r}: cannot be read without pickle ({exc}); "
                           f"object arrays are not features") from None


def _map_npz_member(path: str, info: zipfile.ZipInfo) -> Optional[np.ndarray]:
    """The uncompressed member ``info`` memory-mapped in place, or None when
    that is not possible (then it is read into memory on first use)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
        except ValueError:
            return None
        if dtype.hasobject:
            return None  # refused with a clear message when read
        return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                         order="F" if fortran else "C")


def _open_safetensors(path: str) -> Dict[str, Array]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FeatureError(f"{path!r}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise FeatureError(f"{path!r}: not a safetensors file (header length {header_len} > file size)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FeatureError(f"{path!r}: not a safetensors file (bad JSON header)") from None
    base = 8 + header_len
    arrays = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise FeatureError(f"{path!r}, key {key!r}: unsupported safetensors dtype {meta.get('dtype')!r}")
        shape = tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * np.dtype(dtype).itemsize or base + end > size:
            raise FeatureError(f"{path!r}, key {key!r}: data offsets do not match shape {shape} (truncated file?)")
        data = (np.memmap(path, dtype=dtype, mode="r", offset=base + begin, shape=shape) if count
                else np.zeros(shape, dtype))  # np.memmap refuses empty maps
        arrays[key] = Array(path, key, data, bfloat16=meta["dtype"] == "BF16")
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
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            arrays[key] = Array(path, str(key), list(value))
        elif isinstance(value, torch.Tensor):
            value = value.detach()
            if value.dtype == torch.bfloat16:
                arrays[key] = Array(path, str(key), value.view(torch.int16).numpy().view(np.uint16), bfloat16=True)
            else:
                try:
                    arrays[key] = Array(path, str(key), value.numpy())
                except TypeError:
                    raise FeatureError(f"{path!r}, key {key!r}: dtype {value.dtype} has no numpy equivalent") from None
        else:
            raise FeatureError(f"{path!r}, key {key!r}: must be a tensor (or a list of split names); "
                               f"got {type(value).__name__}")
    return arrays

