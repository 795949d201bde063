"""Write ``torch.save``-compatible files without torch (test helper, not part of the package).

``save_torch_state_dict`` produces the same container layouts that
``diffusion_jax.runtime.torch_pickle`` reads (see its module docstring): the zip format
(``archive/data.pkl`` + ``archive/data/<key>`` + ``archive/byteorder``) or, with
``legacy=True``, the pre-1.6 stream (magic, protocol, sys_info, object, storage keys, raw
storages each prefixed by an 8-byte element count). Tensors are pickled as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``
exactly as torch does, so ``torch.load(path, weights_only=True)`` reads the files too.

A numpy view (transpose, slice, step) is written as a strided view of its base array's
storage, and arrays sharing a base share one storage, as torch tensors sharing memory do.
``ForeignCall`` lets a test plant an arbitrary pickle global to check that loading refuses it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

_STORAGE_NAMES = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
}


@dataclass(frozen=True, eq=False)
class _Global:
    """Pickled as the opcode ``GLOBAL module name`` without importing ``module``."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # save_reduce insists on a callable
        raise TypeError(f"{self.module}.{self.name} is a pickling placeholder")


@dataclass(frozen=True)
class ForeignCall:
    """Pickled as ``module.name(*args)``: a test stand-in for a malicious payload."""

    module: str
    name: str
    args: tuple


@dataclass(frozen=True, eq=False)
class RawTensor:
    """A tensor given as torch stores it: 1-D ``storage``, ``offset``, ``shape``, ``stride``.

    Written verbatim (no consistency check), so tests can also produce malformed views.
    """

    storage: np.ndarray
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class _StorageRef:
    key: str
    data: np.ndarray  # 1-D, C-contiguous, native byte order


@dataclass(frozen=True, eq=False)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


class _Storages:
    """Assigns storages to arrays; views of one contiguous root array share its storage."""

    def __init__(self) -> None:
        self.by_root: dict[int, _StorageRef] = {}
        self.roots: list[np.ndarray] = []  # keep roots alive so ids stay unique

    def tensor(self, array: np.ndarray) -> _TensorRef:
        item = array.dtype.itemsize
        root = _root(array)
        shares = (
            root.dtype == array.dtype
            and root.flags.c_contiguous
            and root.dtype.isnative
            and all(s >= 0 and s % item == 0 for s in array.strides)
            and (_address(array) - _address(root)) % item == 0
            and _address(array) >= _address(root)
        )
        if not shares:
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
            root = array
        if id(root) not in self.by_root:
            self.by_root[id(root)] = _StorageRef(str(len(self.by_root)), root.reshape(-1))
            self.roots.append(root)
        storage = self.by_root[id(root)]
        offset = (_address(array) - _address(root)) // item
        stride = tuple(s // item for s in array.strides)
        if array.size <= 1:  # torch's strides for size-1 dims are arbitrary; keep C order
            stride = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))
        return _TensorRef(storage, offset, tuple(array.shape), stride)


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler allows a custom dispatch
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages: dict[str, _StorageRef] = {}

    def save_raw_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = save_raw_global

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, _StorageRef):
            return None
        self.storages[obj.key] = obj
        storage_type = _Global("torch", _STORAGE_NAMES[obj.data.dtype.name])
        pid = ("storage", storage_type, obj.key, "cpu", int(obj.data.size))
        return (*pid, None) if self.legacy else pid

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _TensorRef):
            rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
            hooks = collections.OrderedDict()
            return rebuild, (obj.storage, obj.offset, obj.shape, obj.stride, False, hooks)
        if isinstance(obj, ForeignCall):
            return _Global(obj.module, obj.name), tuple(obj.args)
        return NotImplemented


def _convert(obj: Any, storages: _Storages) -> Any:
    if isinstance(obj, RawTensor):
        storage = storages.tensor(np.array(obj.storage).reshape(-1)).storage
        return _TensorRef(storage, obj.offset, tuple(obj.shape), tuple(obj.stride))
    if isinstance(obj, np.ndarray):
        return storages.tensor(obj)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _convert(v, storages)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_convert(v, storages) for v in obj)
    return obj


def save_torch_object(obj: Any, path: str | os.PathLike[str], legacy: bool = False) -> None:
    """Write ``obj`` (dicts/lists of np.ndarray, ForeignCall, plain values) like torch.save."""
    storages = _Storages()
    converted = _convert(obj, storages)
    body = io.BytesIO()
    pickler = _TorchPickler(body, legacy)
    pickler.dump(converted)
    used = [pickler.storages[k] for k in sorted(pickler.storages, key=int)]

    if not legacy:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", body.getvalue())
            archive.writestr("archive/byteorder", "little")
            for storage in used:
                data = storage.data.astype(storage.data.dtype.newbyteorder("<"), copy=False)
                archive.writestr(f"archive/data/{storage.key}", data.tobytes())
            archive.writestr("archive/version", "3\n")
            archive.writestr("archive/.data/version", "3\n")
        return

    sys_info = {
        "protocol_version": _PROTOCOL_VERSION,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 8},
    }
    with open(path, "wb") as f:
        for header in (_MAGIC, _PROTOCOL_VERSION, sys_info):
            pickle.dump(header, f, protocol=2)
        f.write(body.getvalue())
        pickle.dump([s.key for s in used], f, protocol=2)
        for storage in used:
            data = storage.data.astype(storage.data.dtype.newbyteorder("<"), copy=False)
            f.write(struct.pack("<q", data.size))
            f.write(data.tobytes())


def save_torch_state_dict(
    state: dict[str, np.ndarray], path: str | os.PathLike[str], legacy: bool = False
) -> None:
    """Write ``{name: array}`` as ``torch.save(state_dict, path)`` would (zip or legacy)."""
    save_torch_object(dict(state), path, legacy=legacy)
