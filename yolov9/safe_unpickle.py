"""Read a pickled torch checkpoint without executing it: tensors and plain data, inert records for classes.

``torch.load(weights_only=False)`` imports every module a file names and calls what it says; a
reference checkpoint names classes from the reference's own repository (``models.yolo.*``,
``models.common.*``) and ``torch.nn``. Here every global the file names goes through an allow-list:

- torch storages (``torch.HalfStorage``, ...) and the tensor/parameter rebuild functions become
  plain tensors (strided views of the storage bytes read from the file, never code);
- ``collections.OrderedDict``, ``builtins.set``, ``torch.Size`` (of ints); numpy dtypes, scalars and
  arrays become plain numbers (decoded with :mod:`struct`, numpy is never imported);
- every class from the reference's modules (``models``, ``utils``) or ``torch.nn`` becomes an
  :class:`InertRecord` subclass named after it, holding the arguments and state the file gives it;
- anything else (a function, ``os.system``, ``builtins.eval``, ...) refuses the whole file with an
  :class:`UnsafeCheckpointError` that names the global.

Both torch formats are read: the zip archive (``data.pkl`` + ``data/<key>`` storages, torch >= 1.6)
and the legacy stream (magic number, then pickles, then raw storages).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
RECORD_MODULES = ("models", "utils", "torch.nn")

# Python 2 module names that protocol-2 pickles carry (the pickler maps builtins -> __builtin__).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in set(_STORAGE_DTYPES.values())}

# numpy (kind, itemsize) -> struct format character
_NUMPY_FORMATS = {
    ("f", 2): "e",
    ("f", 4): "f",
    ("f", 8): "d",
    ("i", 1): "b",
    ("i", 2): "h",
    ("i", 4): "i",
    ("i", 8): "q",
    ("u", 1): "B",
    ("u", 2): "H",
    ("u", 4): "I",
    ("u", 8): "Q",
    ("b", 1): "?",
}
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafeCheckpointError(ValueError):
    """The file names a global outside the allow-list: loading it normally could run code."""


class CheckpointFormatError(ValueError):
    """The file is not a readable torch checkpoint: truncated, corrupt or of an unsupported format."""


class InertRecord:
    """An instance of a class a checkpoint names, reduced to what the file says about it.

    Subclasses are made per pickled class (same ``__name__``); ``pickled_class`` is the full name
    (``models.common.Conv``). ``args`` are the constructor arguments, ``state`` what the file's
    BUILD gave it (a module's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ...).
    """

    pickled_class: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertRecord:
        record = super().__new__(cls)
        record.args, record.kwargs, record.state = args, kwargs, None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def attributes(self) -> dict[str, Any]:
        """The pickled instance dictionary (empty if the file gave none)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            return merged
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<inert {self.pickled_class}>"


class _StorageType:
    """What ``torch.HalfStorage`` and friends stand for in a persistent id: an element type."""

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _NumpyDType:
    """A pickled ``numpy.dtype``: the type code (``'f8'``) and, after BUILD, its byte order."""

    def __init__(self, code: Any = "", align: Any = False, copy: Any = True) -> None:
        self.code, self.byteorder = code, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def struct_format(self) -> str:
        code = self.code.decode("latin1") if isinstance(self.code, bytes) else str(self.code)
        kind, size = code[:1], code[1:]
        char = _NUMPY_FORMATS.get((kind, int(size))) if size.isdigit() else None
        if char is None:
            raise CheckpointFormatError(f"numpy value of dtype {code!r} is not a plain number")
        return {"<": "<", ">": ">"}.get(self.byteorder, "=") + char


class _NumpyArray:
    """A pickled ``numpy.ndarray``, decoded on BUILD to ``shape`` and a flat tuple of plain numbers."""

    def __init__(self, *args: Any) -> None:
        self.shape: tuple[int, ...] = ()
        self.values: tuple[Any, ...] = ()

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _NumpyDType)):
            raise CheckpointFormatError("numpy array with an unrecognised pickled state")
        _, shape, dtype, _, raw = state
        if not isinstance(raw, bytes):
            raise CheckpointFormatError("numpy array of objects is not plain numbers")
        fmt = dtype.struct_format()
        self.shape = tuple(shape)
        self.values = tuple(v for (v,) in struct.iter_unpack(fmt, raw))

    def tolist(self) -> list[Any]:
        return list(self.values)


def _numpy_scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise CheckpointFormatError("numpy scalar with an unrecognised pickled form")
    (value,) = struct.unpack(dtype.struct_format(), data)
    return value


def _numpy_reconstruct(cls: Any, *args: Any) -> _NumpyArray:
    if cls is not _NumpyArray:
        raise CheckpointFormatError("numpy _reconstruct of something other than ndarray")
    return _NumpyArray()


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError("_codecs.encode used for something other than latin-1 bytes")
    return text.encode("latin1")


def _torch_size(dims: Any = ()) -> torch.Size:
    """``torch.Size`` as newer torch versions pickle a module's recorded shapes: from a tuple of ints only."""
    if not isinstance(dims, tuple | list) or not all(type(d) is int for d in dims):
        raise CheckpointFormatError("torch.Size of something other than a tuple of ints")
    return torch.Size(dims)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """A strided view of ``storage`` (a 1-D tensor holding the storage's elements)."""
    if not isinstance(storage, torch.Tensor):
        raise CheckpointFormatError("a tensor refers to something that is not a storage")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"a tensor does not fit its storage ({e})") from e


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointFormatError("a parameter holds something that is not a tensor")
    return data


def _allowed_global(module: str, name: str) -> Any:
    """The safe stand-in for ``module.name``, or None if the global is not allowed."""
    if module == "torch":
        if name in _STORAGE_DTYPES:
            return _StorageType(name)
        if name == "Size":
            return _torch_size
        return _TORCH_DTYPES.get(name)
    if module == "torch._utils":
        rebuild: dict[str, Callable[..., Any]] = {
            "_rebuild_tensor": _rebuild_tensor,
            "_rebuild_tensor_v2": _rebuild_tensor,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter,
        }
        return rebuild.get(name)
    if module == "torch.storage" and name == "UntypedStorage":
        return _StorageType(name)
    simple = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "dtype"): _NumpyDType,
        ("numpy", "ndarray"): _NumpyArray,
    }
    if (module, name) in simple:
        return simple[module, name]
    if module in _NUMPY_MULTIARRAY:
        return {"scalar": _numpy_scalar, "_reconstruct": _numpy_reconstruct}.get(name)
    return None


def _is_record_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in RECORD_MODULES)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose every global lookup goes through the allow-list; storages via ``storage_loader``.

    ``storage_loader(storage_type, key, numel)`` returns a 1-D tensor of ``numel`` elements of the
    storage type's dtype. Legacy persistent ids carry extra fields (view metadata), handled here too.
    """

    def __init__(
        self, file: IO[bytes], storage_loader: Callable[[_StorageType, str, int], torch.Tensor]
    ) -> None:
        super().__init__(file)
        self._storage_loader = storage_loader
        self._records: dict[tuple[str, str], type[InertRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        allowed = _allowed_global(module, name)
        if allowed is not None:
            return allowed
        if _is_record_module(module):
            key = (module, name)
            if key not in self._records:
                self._records[key] = type(name, (InertRecord,), {"pickled_class": f"{module}.{name}"})
            return self._records[key]
        raise UnsafeCheckpointError(
            f"the file names the global {module}.{name}, which is not a tensor, a storage or a "
            "class of the reference model; it is refused because loading it could run code"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointFormatError(f"unrecognised persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) > 1:  # legacy files record a module class with its source
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise CheckpointFormatError(f"unrecognised persistent id {pid!r}")
        storage_type, key, _, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise CheckpointFormatError(f"unrecognised storage reference {pid!r}")
        storage = self._storage_loader(storage_type, str(key), numel)
        view = pid[5] if len(pid) == 6 else None
        if view is not None:
            _, offset, size = view
            storage = storage[offset : offset + size]
        return storage


def load_inert(path: str | Path) -> Any:
    """Unpickle the torch checkpoint at ``path`` without executing it.

    Returns the pickled object graph: plain Python data, tensors (in the file's dtypes, on the
    CPU) and :class:`InertRecord` instances for the classes it names. Raises
    :class:`UnsafeCheckpointError` naming a refused global, :class:`CheckpointFormatError` for a
    truncated, corrupt or unsupported file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head.startswith(b"PK"):
            return _load_zip(path)
        if head.startswith(b"\x80"):
            return _load_legacy(path)
    except (UnsafeCheckpointError, CheckpointFormatError) as e:
        raise type(e)(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
        raise CheckpointFormatError(f"{path}: truncated or corrupt checkpoint ({e})") from e
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointFormatError(f"{path}: not a checkpoint this reader understands ({e!r})") from e
    raise CheckpointFormatError(
        f"{path}: not a torch checkpoint (neither a torch zip archive nor a legacy torch pickle stream)"
    )


def _storage_tensor(raw: bytes | bytearray, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype, count=numel)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"a torch zip checkpoint holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order != sys.byteorder:
                raise CheckpointFormatError(f"written {order}-endian, this machine is {sys.byteorder}")
        storages: dict[str, torch.Tensor] = {}

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> torch.Tensor:
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise CheckpointFormatError(f"storage {key!r} is missing from the archive")
                nbytes = numel * _element_size(storage_type.dtype)
                if archive.getinfo(record).file_size < nbytes:
                    raise CheckpointFormatError(f"storage {key!r} is shorter than its {numel} elements")
                storages[key] = _storage_tensor(archive.read(record), storage_type.dtype, numel)
            if storages[key].dtype != storage_type.dtype:
                raise CheckpointFormatError(f"storage {key!r} is used with two element types")
            return storages[key]

        with archive.open(pickles[0]) as data:
            return RestrictedUnpickler(io.BytesIO(data.read()), load_storage).load()


def _load_legacy(path: Path) -> Any:
    """The pre-zip format: magic number, protocol, system info, the object, storage keys, raw storages."""
    size = path.stat().st_size

    def no_storages(storage_type: _StorageType, key: str, numel: int) -> torch.Tensor:
        raise CheckpointFormatError("storage reference outside the object pickle")

    with open(path, "rb") as f:
        if RestrictedUnpickler(f, no_storages).load() != LEGACY_MAGIC_NUMBER:
            raise CheckpointFormatError("a pickle, but not a torch checkpoint (no torch magic number)")
        protocol = RestrictedUnpickler(f, no_storages).load()
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(f"unsupported legacy torch protocol {protocol!r}")
        sys_info = RestrictedUnpickler(f, no_storages).load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is not (sys.byteorder == "little"):
            raise CheckpointFormatError("written with a byte order other than this machine's")
        storages: dict[str, torch.Tensor] = {}

        def allocate(storage_type: _StorageType, key: str, numel: int) -> torch.Tensor:
            if key not in storages:
                if numel * _element_size(storage_type.dtype) > size:
                    raise CheckpointFormatError(f"storage {key!r} is larger than the file")
                storages[key] = torch.empty(numel, dtype=storage_type.dtype)
            return storages[key]

        result = RestrictedUnpickler(f, allocate).load()
        keys = RestrictedUnpickler(f, no_storages).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise CheckpointFormatError("the storage list does not match the storages the object uses")
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("=q", f.read(8))
            raw = f.read(storage.numel() * storage.element_size())
            if numel != storage.numel() or len(raw) != storage.numel() * storage.element_size():
                raise CheckpointFormatError(f"storage {key!r} is truncated or of the wrong size")
            if raw:
                storage.view(torch.uint8).copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        return result
