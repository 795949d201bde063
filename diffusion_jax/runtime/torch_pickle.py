"""Read PyTorch-saved state dicts into numpy arrays, without torch and without running pickle code.

``torch.save`` writes a pickle whose tensors are rebuilt by calling
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` on storages that the
pickle refers to by *persistent id*. Two containers exist:

* the zip format (torch >= 1.6, the default): ``<name>/data.pkl`` holds the pickle, each
  storage's raw bytes are the entry ``<name>/data/<key>``, and ``<name>/byteorder`` (when
  present) says ``little`` or ``big``; the persistent id is
  ``('storage', StorageType, key, location, numel)``.
* the legacy format (``_use_new_zipfile_serialization=False``, torch < 1.6): five items in one
  stream: pickled magic number ``0x1950a86a20f9469cfc6c``, pickled protocol version ``1001``,
  pickled ``sys_info`` dict, the pickled object (persistent id
  ``('storage', StorageType, key, location, numel, view_metadata)``), the pickled list of
  storage keys, then for each key in that order an 8-byte little-endian element count followed
  by the storage's raw bytes.

The unpickler here is restricted: :meth:`_RestrictedUnpickler.find_class` resolves only the
tensor-rebuild functions, the storage classes, the dtypes used by ``_rebuild_tensor_v3`` and
``collections.OrderedDict`` to inert local stand-ins; any other global (``os.system``,
``builtins.eval``, ...) raises :class:`ValueError` naming it before anything is called.
Tensors come back as C-contiguous numpy copies (views honour storage offset and strides).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from diffusion_jax.runtime import errors

__all__ = [
    "LEGACY_MAGIC_NUMBER",
    "LEGACY_PROTOCOL_VERSION",
    "STORAGE_DTYPES",
    "TorchPickleError",
    "load_torch_file",
    "load_torch_state_dict",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class TorchPickleError(errors.InputError):
    """A torch file is malformed or carries something this reader refuses to load."""


def _bfloat16() -> np.dtype:
    import ml_dtypes  # shipped with jax; imported only when a bfloat16 tensor is present

    return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype (or a zero-argument factory for optional dtypes).
STORAGE_DTYPES: dict[str, np.dtype | Callable[[], np.dtype]] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype attribute name -> numpy dtype, for ``_rebuild_tensor_v3`` (which pickles the
# dtype as a global such as ``torch.uint16`` next to an untyped byte storage).
_TORCH_DTYPES: dict[str, np.dtype | Callable[[], np.dtype]] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": _bfloat16,
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}


@dataclass(frozen=True)
class _StorageType:
    """Inert stand-in for a ``torch.<X>Storage`` class found in the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        entry = STORAGE_DTYPES[self.name]
        return entry() if callable(entry) else entry


@dataclass(frozen=True)
class _TorchDtype:
    """Inert stand-in for a ``torch.<dtype>`` object found in the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        entry = _TORCH_DTYPES[self.name]
        return entry() if callable(entry) else entry


def _as_strided_copy(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """``storage[offset:]`` viewed with ``size``/``stride`` (in elements), copied contiguous.

    Bounds are checked first so that a malformed file cannot make ``as_strided`` read past
    the storage buffer.
    """
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride):
        raise TorchPickleError(f"tensor size {size} and stride {stride} differ in rank")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise TorchPickleError(f"negative offset/size/stride: {offset}, {size}, {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise TorchPickleError(
            f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last} of a storage with {storage.size} elements"
        )
    base = storage[offset:]
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (torch >= 0.4)."""
    del requires_grad, backward_hooks, metadata
    return _as_strided_copy(_check_storage(storage), storage_offset, size, stride)


def _rebuild_tensor(
    storage: np.ndarray, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor`` (torch < 0.4)."""
    return _as_strided_copy(_check_storage(storage), storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    dtype: _TorchDtype,
    metadata: Any = None,
) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor_v3``: an untyped byte storage plus a dtype."""
    del requires_grad, backward_hooks, metadata
    storage = _check_storage(storage)
    if not isinstance(dtype, _TorchDtype):
        raise TorchPickleError(f"_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}")
    np_dtype = dtype.dtype
    usable = storage.nbytes - storage.nbytes % np_dtype.itemsize
    typed = storage.view(np.uint8)[:usable].view(np_dtype)
    return _as_strided_copy(typed, storage_offset, size, stride)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its data here."""
    del requires_grad, backward_hooks
    return _check_storage(data)


def _rebuild_parameter_with_state(
    data: np.ndarray, requires_grad: bool, backward_hooks: Any, state: Any
) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_parameter_with_state`` (state is dropped)."""
    del requires_grad, backward_hooks, state
    return _check_storage(data)


def _check_storage(obj: Any) -> np.ndarray:
    if not isinstance(obj, np.ndarray):
        raise TorchPickleError(f"expected a storage/tensor, got {type(obj).__name__}")
    return obj


_REBUILD_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor state dict needs.

    ``load_storage(storage_type, key, numel)`` returns the 1-D numpy buffer of a persistent
    storage id; results are cached by key (torch pickles one persistent id per tensor, and
    several tensors may share one storage). Legacy view metadata slices that buffer.
    """

    def __init__(
        self,
        file: IO[bytes],
        load_storage: Callable[[_StorageType, str, int], np.ndarray] | None,
    ) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in _REBUILD_FUNCTIONS:
            return _REBUILD_FUNCTIONS[name]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchPickleError(
            f"refusing to load pickle global '{module}.{name}': only torch tensor-rebuild "
            "globals, storage classes and collections.OrderedDict are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise TorchPickleError("unexpected persistent id in a plain pickle")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise TorchPickleError(f"unsupported persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise TorchPickleError(f"unsupported persistent id type {typename!r}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"persistent id names no storage class: {storage_type!r}")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            self._storages[key] = self._load_storage(storage_type, key, int(numel))
        storage = self._storages[key]
        if view_metadata is not None:  # legacy storage views: (view_key, offset, size)
            _view_key, offset, view_size = view_metadata
            storage = storage[int(offset) : int(offset) + int(view_size)]
        return storage


def _read_zip(path: str | os.PathLike[str]) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl_names = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise TorchPickleError(f"{path}: expected one '<name>/data.pkl' entry, got {pkl_names}")
        prefix = pkl_names[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise TorchPickleError(f"{path}: unknown byteorder {byteorder!r}")

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
            dtype = storage_type.dtype
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) < numel * dtype.itemsize:
                raise TorchPickleError(
                    f"{path}: storage {key} has {len(raw)} bytes, expected {numel * dtype.itemsize}"
                )
            order = "<" if byteorder == "little" else ">"
            array = np.frombuffer(raw, dtype=dtype.newbyteorder(order), count=numel)
            return array.astype(dtype.newbyteorder("="), copy=False)

        with archive.open(pkl_names[0]) as f:
            return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


def _read_legacy(f: IO[bytes], path: str | os.PathLike[str]) -> Any:
    def plain_load() -> Any:
        return _RestrictedUnpickler(f, None).load()

    magic = plain_load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise TorchPickleError(f"{path}: not a torch file (no zip archive, bad magic number)")
    protocol = plain_load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise TorchPickleError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = plain_load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    order = "<" if little else ">"

    pending: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        # Filled in place once the raw storages, which follow the pickle, have been read.
        pending[key] = np.empty(numel, dtype=storage_type.dtype)
        return pending[key]

    # Tensors are rebuilt (copied) during unpickling, before the storage bytes are known, so
    # the object is unpickled twice: first to learn the storages, then after filling them.
    start = f.tell()
    _RestrictedUnpickler(f, load_storage).load()
    keys = plain_load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(pending):
        raise TorchPickleError(f"{path}: storage key list does not match the pickle")
    for key in map(str, keys):
        buffer = pending[key]
        header = f.read(8)
        if len(header) != 8:
            raise TorchPickleError(f"{path}: truncated before storage {key}")
        (numel,) = struct.unpack(order + "q", header)
        nbytes = numel * buffer.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes or numel < buffer.size:
            raise TorchPickleError(f"{path}: storage {key} truncated or too small")
        data = np.frombuffer(raw, dtype=buffer.dtype.newbyteorder(order), count=buffer.size)
        buffer[...] = data
    end = f.tell()
    f.seek(start)
    obj = _RestrictedUnpickler(f, lambda _t, key, _n: pending[key]).load()
    f.seek(end)
    return obj


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """Load any ``torch.save`` file whose pickle uses only tensor globals; tensors -> numpy.

    Args:
      path: a file written by ``torch.save`` in the zip (torch >= 1.6) or legacy format.

    Returns:
      The saved object with every tensor replaced by a C-contiguous ``np.ndarray`` of the
      matching dtype and shape (``OrderedDict``/``dict``/``list``/``tuple`` kept as is).

    Raises:
      TorchPickleError (a ``ValueError``): a global other than the allowed ones, or a
        malformed file. Nothing from the file is executed.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch's own test: a zip local file header
        if not is_zip:
            f.seek(0)
            return _read_legacy(f, path)
    return _read_zip(path)


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a torch-saved state dict (``{name: tensor}``) as ``{name: np.ndarray}``.

    Args:
      path: a ``torch.save(model.state_dict(), path)`` file, zip or legacy format.

    Returns:
      A plain dict from parameter/buffer name (e.g. ``"Conv2d_1a_3x3.conv.weight"``) to a
      numpy array with torch's shape (``[out, in, kh, kw]`` for convolutions) and dtype.

    Raises:
      TorchPickleError (a ``ValueError``): forbidden pickle global, malformed file, or an
        object that is not a flat mapping of names to tensors.
    """
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise TorchPickleError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = {
        str(k): type(v).__name__
        for k, v in obj.items()
        if not isinstance(k, str) or not isinstance(v, np.ndarray)
    }
    if bad:
        raise TorchPickleError(f"{path}: entries that are not named tensors: {bad}")
    return dict(obj)
