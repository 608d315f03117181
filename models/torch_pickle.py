"""Read PyTorch `.pth` / `.pt` / `.bin` checkpoints into NumPy arrays without importing torch.

`load(path)` returns what `torch.save` was given (normally a state dict: parameter names ->
arrays; a training checkpoint may nest it in a dict), with every tensor replaced by a NumPy
array of the tensor's dtype, shape and values (strided views are gathered into contiguous
arrays). Two file layouts are read:

* the zip layout (`torch.save` since torch 1.6): `<archive>/data.pkl` is the pickle and each
  storage is the record `<archive>/data/<key>` (raw bytes, little-endian unless
  `<archive>/byteorder` says `big`);
* the legacy layout (`_use_new_zipfile_serialization=False`, and files written before 1.6): five
  consecutive parts: a pickled magic number, a pickled protocol version, a pickled dict of
  system facts (byte order), the main pickle, a pickled list of storage keys; then, in that key
  order, each storage as an 8-byte little-endian element count followed by its raw bytes.

In both, the main pickle refers to storages by persistent ids
`('storage', storage_type, key, location, numel[, view])` and builds tensors with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

Safety: the unpickler resolves only the globals a state dict needs (`collections.OrderedDict`,
the tensor and parameter rebuild functions, the storage types, and NumPy number scalars that
checkpoints keep beside it); anything else (a class of a
training script, `os.system`, ...) is refused before it runs, as is a tensor whose strides
reach outside its storage. Every failure is a one-line `ValueError` naming the file.

bfloat16 tensors (which NumPy lacks) are returned as float32 (exact); quantized tensors and
storage views of very old files are refused.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["load", "TorchPickleError"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION

# torch storage type name -> NumPy dtype of its elements ("bfloat16": raw 16-bit words, widened
# to float32 after reading).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("float32"),
    "DoubleStorage": np.dtype("float64"),
    "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
    "ComplexFloatStorage": np.dtype("complex64"),
    "ComplexDoubleStorage": np.dtype("complex128"),
    "UntypedStorage": np.dtype("uint8"),
}


class TorchPickleError(ValueError):
    """A file that `load` refuses; `reason` is the message without the file name."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), " ".join(str(reason).split())
        super().__init__(f"cannot read {self.path!r} as a torch checkpoint: {self.reason}")


class _StorageType:
    """Stands for a torch storage class (`torch.FloatStorage`, ...) inside the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else self.dtype.itemsize


class _Storage:
    """A storage named by the pickle; `data` (a 1-D array) is filled once its bytes are read."""

    def __init__(self, key: str, stype: _StorageType, numel: int):
        self.key, self.stype, self.numel = key, stype, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor to build once its storage is read: `_rebuild_tensor_v2`'s arguments."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor rebuilt from something that is not a storage")
        if not (_is_ints(size) and _is_ints(stride) and len(size) == len(stride)
                and isinstance(offset, int) and offset >= 0):
            raise pickle.UnpicklingError(f"bad tensor layout: offset {offset!r}, size {size!r}, "
                                         f"stride {stride!r}")
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)


def _is_ints(t) -> bool:
    return isinstance(t, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in t)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("a parameter rebuilt from something that is not a tensor")
    return data


def _numpy_scalar(dtype, data=None):
    """A NumPy scalar as pickled by NumPy (e.g. a metric or an epoch in a checkpoint)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("a NumPy scalar that is not a plain number")
    return np.frombuffer(data, dtype, count=1)[0]


def _latin1_bytes(text, encoding="utf-8"):
    """How pickle protocol 2 writes `bytes`: `_codecs.encode(text, "latin1")`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("an encode call that is not bytes as latin-1")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a state dict; storages come through `persistent_load`."""

    def __init__(self, file, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = {} if storages is None else storages

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name} "
                                     "(only tensors, storages and dicts are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        stype, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (files of torch before 1.0) are not read")
        if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage id {str(pid)[:80]}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, stype, numel)
        return self.storages[key]


def _array(raw, stype: _StorageType, count: int, byteorder: str = "little") -> np.ndarray:
    if stype.dtype == "bfloat16":
        words = np.frombuffer(raw, dtype=np.dtype("uint16").newbyteorder(
            "<" if byteorder == "little" else ">"), count=count)
        return (words.astype(np.uint32) << 16).view(np.float32)
    dtype = stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
    return np.frombuffer(raw, dtype=dtype, count=count).astype(stype.dtype.newbyteorder("="),
                                                                copy=False)


def _tensor(ref: _TensorRef) -> np.ndarray:
    data = ref.storage.data
    if any(s == 0 for s in ref.size):
        return np.zeros(ref.size, data.dtype)
    last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride))
    if last >= len(data):
        raise ValueError(f"a tensor of shape {ref.size} (offset {ref.offset}, strides "
                         f"{ref.stride}) reaches past its storage of {len(data)} elements")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset:], shape=ref.size,
        strides=tuple(st * data.itemsize for st in ref.stride), writeable=False)
    return np.array(view, order="C")  # a contiguous copy that owns its memory


def _materialise(obj, seen=None):
    """`obj` with every `_TensorRef` replaced by its array (dicts, lists and tuples walked)."""
    seen = set() if seen is None else seen
    if isinstance(obj, _TensorRef):
        return _tensor(obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise ValueError("the file holds a bare storage, not tensors")
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in seen:
            raise ValueError("the pickle refers to itself")
        seen.add(id(obj))
        if isinstance(obj, dict):
            out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
            for k, v in obj.items():
                out[k] = _materialise(v, seen)
        else:
            out = type(obj)(_materialise(v, seen) for v in obj)
        seen.discard(id(obj))
        return out
    return obj


def _load_zip(f) -> object:
    with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"a zip without exactly one data.pkl record ({len(pkl)} found)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"unknown byte order {byteorder!r}")
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
        for key, st in storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise ValueError(f"storage record {record!r} is missing")
            raw = zf.read(record)
            if len(raw) < st.numel * st.stype.itemsize:
                raise ValueError(f"storage {key!r} has {len(raw)} bytes, "
                                 f"{st.numel * st.stype.itemsize} expected")
            st.data = _array(raw, st.stype, st.numel, byteorder)
    return obj


def _load_legacy(f) -> object:
    def small_pickle():
        return _Unpickler(f).load()

    if small_pickle() != LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (wrong magic number)")
    protocol = small_pickle()
    if protocol != LEGACY_PROTOCOL:
        raise ValueError(f"legacy protocol version {protocol!r} (only {LEGACY_PROTOCOL} is read)")
    sys_info = small_pickle()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("written on a big-endian machine (not read)")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages).load()
    keys = small_pickle()
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise ValueError("its storage key list does not match the storages its tensors use")
    for key in map(str, keys):
        st = storages[key]
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"it ends before storage {key!r}")
        (count,) = struct.unpack("<q", head)
        if count != st.numel:
            raise ValueError(f"storage {key!r} holds {count} elements, the pickle says "
                             f"{st.numel}")
        nbytes = count * st.stype.itemsize
        raw = f.read(nbytes)
        if len(raw) < nbytes:
            raise ValueError(f"it ends inside storage {key!r} ({len(raw)} of {nbytes} bytes)")
        st.data = _array(raw, st.stype, count)
    return obj


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The object saved with `torch.save` at `path`, tensors as NumPy arrays (module doc).

    Raises `TorchPickleError` (a `ValueError`; one line naming the file) for a missing,
    truncated or foreign file, or one whose pickle needs anything but tensors and dicts.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            start = f.read(4)
            if start.startswith(b"PK\x03\x04"):
                if not zipfile.is_zipfile(f):
                    raise ValueError("a zip file that is truncated or damaged")
                obj = _load_zip(f)
            elif start.startswith(b"\x80"):
                f.seek(0)
                obj = _load_legacy(f)
            else:
                raise ValueError("neither a torch zip file nor a legacy torch file")
        return _materialise(obj)
    except TorchPickleError:
        raise
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            struct.error, KeyError, IndexError, TypeError, AttributeError,
            RecursionError, MemoryError, UnicodeDecodeError) as e:
        reason = str(e) or type(e).__name__
        if isinstance(e, EOFError):
            reason = "the file ends too early (truncated?)"
        elif isinstance(e, (pickle.UnpicklingError, KeyError, IndexError, TypeError,
                            AttributeError)) and "refusing" not in reason:
            reason = f"not a torch pickle ({type(e).__name__}: {reason})"
        raise TorchPickleError(path, reason[:300]) from e
