"""Read a legacy (pre-1.6, non-zip) PyTorch ``state_dict`` file without importing torch.

The legacy layout written by ``torch.save(..., _use_new_zipfile_serialization=False)`` is a
plain sequence on one stream:

1. pickle: magic number ``0x1950A86A20F9469CFC6C``
2. pickle: protocol version ``1001``
3. pickle: sysinfo dict (endianness, type sizes)
4. pickle: the state dict itself; tensors appear as
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
   whose ``storage`` is a persistent id
   ``('storage', StorageType, key, location, numel, view_metadata)``
5. pickle: the list of storage keys, in the order their data follows
6. for each key: little-endian int64 element count, then the raw little-endian elements

Unpickling runs whatever callables the stream names, so the unpickler here resolves only the
handful of globals such a file legitimately needs, to inert local stand-ins, and refuses
everything else with :class:`UnsafePickleError`. torch itself is never imported.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

__all__ = ["CheckpointFormatError", "UnsafePickleError", "load_legacy_state_dict"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of its elements (always stored little-endian here).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    # numpy has no bfloat16: read the raw 16 bits and widen them to float32 afterwards.
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(ValueError):
    """The pickle references a global that is not on the allow-list (it could run code)."""


class CheckpointFormatError(ValueError):
    """The file is not a well-formed legacy PyTorch state dict."""


@dataclass(frozen=True)
class _StorageType:
    """Inert stand-in for a ``torch.*Storage`` class: only remembers its element type."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage referenced by the state-dict pickle; its bytes follow later in the file."""

    key: str
    storage_type: _StorageType
    numel: int
    # Legacy files may reference a view into a larger storage: (view_key, offset, view_numel).
    view: tuple[str, int, int] | None


@dataclass(frozen=True)
class _TensorRef:
    """Arguments of ``_rebuild_tensor_v2``, resolved into an array once storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: validates and records its arguments."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointFormatError(
            f"tensor storage must be a persistent storage id, got {type(storage)}"
        )
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointFormatError(f"bad storage offset {storage_offset!r}")
    size_t, stride_t = tuple(size), tuple(stride)
    if len(size_t) != len(stride_t) or not all(isinstance(v, int) for v in size_t + stride_t):
        raise CheckpointFormatError(f"bad tensor geometry size={size!r} stride={stride!r}")
    if any(v < 0 for v in size_t + stride_t):
        raise CheckpointFormatError(f"negative size or stride: size={size!r} stride={stride!r}")
    # Hooks would be python callables re-attached by torch; a state dict never has any.
    if backward_hooks:
        raise UnsafePickleError("tensor carries backward hooks; refusing")
    return _TensorRef(storage, storage_offset, size_t, stride_t)


# Every global the state-dict pickle may name, mapped to what it resolves to. Anything else
# (os.system, builtins.eval, other torch functions, ...) is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and legacy storage persistent ids."""

    def __init__(self, file: IO[bytes], allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle references {module}.{name}, which is not allowed in a state-dict file"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"persistent id names a non-storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointFormatError(f"malformed storage id {pid!r}")
        if view is not None and not (
            isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])
        ):
            raise CheckpointFormatError(f"malformed storage view {view!r}")
        ref = _StorageRef(key, storage_type, numel, view)
        known = self.storages.setdefault(key, ref)
        if known.numel != numel or known.storage_type != storage_type:
            raise CheckpointFormatError(
                f"storage {key} is declared twice with different types or sizes"
            )
        return ref


def _load_plain(f: IO[bytes]) -> Any:
    """Unpickle a header/key-list pickle, which must not reference any global at all."""
    return _RestrictedUnpickler(f, allowed={}).load()


def _read_storage(f: IO[bytes], ref: _StorageRef) -> np.ndarray:
    """Read one storage record: int64 element count, then ``count`` raw elements."""
    header = f.read(8)
    if len(header) != 8:
        raise CheckpointFormatError(f"file truncated before storage {ref.key}")
    (count,) = struct.unpack("<q", header)
    if count != ref.numel:
        raise CheckpointFormatError(
            f"storage {ref.key}: file holds {count} elements, pickle said {ref.numel}"
        )
    dtype = ref.storage_type.dtype
    nbytes = count * dtype.itemsize
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointFormatError(f"file truncated inside storage {ref.key}")
    return np.frombuffer(data, dtype=dtype)


def _materialize(tensor: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Build a contiguous float32 array from a storage, honouring offset and stride."""
    ref = tensor.storage
    flat = storages[ref.key]
    if ref.view is not None:
        # A storage view is itself a window into its root storage.
        _, view_offset, view_numel = ref.view
        flat = flat[view_offset : view_offset + view_numel]
    # as_strided does no bounds checking, so prove the furthest element lies inside the buffer.
    if 0 not in tensor.size:
        last = tensor.offset + sum(
            (n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True)
        )
        if last >= flat.size:
            raise CheckpointFormatError(
                f"tensor geometry reaches element {last} of a {flat.size}-storage"
            )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :] if 0 not in tensor.size else flat[:0],
        shape=tensor.size,
        strides=tuple(s * itemsize for s in tensor.stride),
        writeable=False,
    )
    if ref.storage_type.name == "BFloat16Storage":
        # bfloat16 is the upper half of a float32.
        return (view.astype(np.uint32) << 16).view(np.float32).copy()
    # np.array, not ascontiguousarray: the latter turns 0-d tensors into shape (1,).
    return np.array(view, dtype=np.float32, order="C", copy=True)


def _check_header(f: IO[bytes]) -> None:
    """Validate the magic number, protocol version and endianness pickles."""
    magic = _load_plain(f)
    if magic != _MAGIC_NUMBER:
        raise CheckpointFormatError("not a legacy PyTorch file (bad magic number)")
    protocol = _load_plain(f)
    if protocol != _PROTOCOL_VERSION:
        raise CheckpointFormatError(f"unsupported legacy PyTorch protocol version {protocol!r}")
    sysinfo = _load_plain(f)
    if not isinstance(sysinfo, dict) or not sysinfo.get("little_endian", False):
        raise CheckpointFormatError(f"only little-endian files are supported, sysinfo={sysinfo!r}")


def load_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a legacy (non-zip) PyTorch ``state_dict`` file as numpy arrays, without torch.

    Args:
        path: the ``.pth`` file.

    Returns:
        ``{name: float32 array}`` in file order; every tensor is copied into a contiguous array.

    Raises:
        UnsafePickleError: the pickle names a global outside the small allow-list.
        CheckpointFormatError: the file is not a well-formed legacy state dict (e.g. it is a
            zip-format checkpoint, or truncated). Both errors are ``ValueError`` subclasses.
    """
    if zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path} is a zip-format (torch>=1.6) checkpoint; only legacy is supported"
        )
    with open(path, "rb") as f:
        _check_header(f)
        unpickler = _RestrictedUnpickler(f, _ALLOWED_GLOBALS)
        state = unpickler.load()
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"expected a state dict, found {type(state).__name__}")
        keys = _load_plain(f)
        if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storages):
            raise CheckpointFormatError(
                "storage key list does not match the storages the pickle references"
            )
        storages = {key: _read_storage(f, unpickler.storages[key]) for key in keys}
    result: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise CheckpointFormatError(f"state dict entry {name!r} is not a tensor")
        result[name] = _materialize(value, storages)
    return result
