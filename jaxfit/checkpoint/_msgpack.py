"""The msgpack encoding of a checkpoint's state, and a reader that is safe on hostile input.

The encoding is the one ``flax.serialization.msgpack_serialize`` uses (numpy arrays as
msgpack extension 1 holding ``(shape, dtype name, C-order bytes)``, numpy scalars as
extension 3, arrays over 1 GiB split into flax's ``__msgpack_chunked_array__`` form), so
``flax.serialization.msgpack_restore`` can read a jaxfit state file and vice versa.

Writing streams leaf by leaf into the file: an array's bytes go to disk straight from its
buffer, so saving never holds a second copy of the whole state in memory.

Reading never unpickles and never trusts a length it has not checked: the input size is
bounded before anything is parsed, every array header is checked against the bytes that
follow it, and any malformed, truncated or oversized input raises
:class:`CheckpointCorruptError` instead of a msgpack, numpy or Unicode error.
"""

from __future__ import annotations

import math
import pickle
import struct
from collections.abc import Callable, Mapping
from typing import Any, Protocol, SupportsIndex

import msgpack
import numpy as np

from jaxfit.checkpoint._errors import CheckpointCorruptError

EXT_NDARRAY = 1
EXT_NPSCALAR = 3
CHUNK_BYTES = 2**30  # flax's MAX_CHUNK_SIZE: msgpack leaves stay well under 2**32 bytes
CHUNK_KEY = "__msgpack_chunked_array__"
DEFAULT_MAX_BYTES = 64 * 2**30
MAX_NDIM = 64

_ALLOWED_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
     "float8_e4m3fn", "float8_e5m2", "int4", "uint4"]
)


def dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype of a name a checkpoint may hold (numeric types only).

    Raises:
      CheckpointCorruptError: any other name.
    """
    if name not in _ALLOWED_DTYPES:
        raise CheckpointCorruptError(
            f"array dtype {name!r} is not one a checkpoint holds "
            f"(expected one of {', '.join(sorted(_ALLOWED_DTYPES))})"
        )
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # installed with jax; registers bfloat16 and the float8 types

        return np.dtype(getattr(ml_dtypes, name))


# --------------------------------------------------------------------------- writing


def _ext_header(code: int, length: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if length in fixed:
        return struct.pack(">Bb", fixed[length], code)
    if length < 2**8:
        return struct.pack(">BBb", 0xC7, length, code)
    if length < 2**16:
        return struct.pack(">BHb", 0xC8, length, code)
    return struct.pack(">BIb", 0xC9, length, code)


def _bin_header(length: int) -> bytes:
    if length < 2**8:
        return struct.pack(">BB", 0xC4, length)
    if length < 2**16:
        return struct.pack(">BH", 0xC5, length)
    return struct.pack(">BI", 0xC6, length)


def array_header(shape: tuple[int, ...], dtype_name: str, nbytes: int,
                 code: int = EXT_NDARRAY) -> bytes:
    """The bytes an array's encoding starts with; its ``nbytes`` C-order bytes follow.

    The extension ``code`` wraps ``(shape, dtype name, bytes)`` as a 3-element msgpack array.
    """
    head = b"\x93" + msgpack.packb(list(shape)) + msgpack.packb(dtype_name) + _bin_header(nbytes)
    return _ext_header(code, len(head) + nbytes) + head


def _write_array(write: Callable[[Any], Any], arr: np.ndarray, code: int, path: str) -> None:
    if arr.dtype.name not in _ALLOWED_DTYPES:
        raise TypeError(
            f"cannot store an array of dtype {arr.dtype} at {path!r}: a checkpoint holds "
            f"arrays of {', '.join(sorted(_ALLOWED_DTYPES))}"
        )
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        arr = arr.copy(order="C")
    write(array_header(arr.shape, arr.dtype.name, arr.nbytes, code))  # data not copied
    if arr.nbytes:
        # A uint8 view: memoryview cannot export ml_dtypes (bfloat16, float8) buffers.
        write(arr.reshape(-1).view(np.uint8).data)


class Encoded:
    """A subtree already encoded: its msgpack bytes as consecutive buffers (``bytes`` or
    memoryviews of arrays), written as they are. Made by :func:`encode_skeleton`."""

    __slots__ = ("parts",)

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple:
        # To the checkpoint writer process (pickle protocol 5): the buffers travel out of
        # band, as their raw bytes, and arrive as bytearrays.
        return (Encoded, ([pickle.PickleBuffer(p) if isinstance(p, memoryview) else p
                           for p in self.parts],))


# Scalars msgpack encodes exactly as ``_write_node`` does, one at a time or in a list.
_PLAIN = frozenset([float, int, str, bool, bytes, type(None)])


def only_plain(values: Any) -> bool:
    """Whether every value is of a type in ``_PLAIN`` (not a subclass): immutable scalars
    msgpack encodes in one call. Tested in C (``map(type, ...)``), not a loop in Python."""
    return set(map(type, values)) <= _PLAIN


def encode_skeleton(skeleton: Any, headers: list[bytes]) -> list:
    """The encoding of a nested dict whose leaves are array slots, as parts: ``bytes`` and,
    where array ``i``'s C-order bytes go, the int ``i`` (after its ``headers[i]``).

    Consecutive bytes are joined: filling the slots gives :class:`Encoded` parts that write
    exactly what :func:`write_tree` writes for the same dict of arrays.
    """
    parts: list = []
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    def emit(piece: Any) -> None:
        if isinstance(piece, bytes) and parts and isinstance(parts[-1], bytes):
            parts[-1] += piece
        else:
            parts.append(piece)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            emit(packer.pack_map_header(len(node)))
            for key, value in node.items():
                emit(packer.pack(key))
                walk(value)
        else:
            emit(headers[node])
            emit(node)

    walk(skeleton)
    return parts


def _write_node(write: Callable[[Any], Any], packer: msgpack.Packer, node: Any,
                path: str) -> None:
    if isinstance(node, Encoded):
        for part in node.parts:
            write(part)
    elif node is None or isinstance(node, (bool, str, bytes)):
        write(packer.pack(node))
    elif isinstance(node, int):
        if not -(2**63) <= node < 2**64:
            raise OverflowError(f"integer at {path!r} does not fit in 64 bits: {node}")
        write(packer.pack(node))
    elif isinstance(node, float):
        write(packer.pack(node))
    elif isinstance(node, np.generic):
        _write_array(write, np.asarray(node), EXT_NPSCALAR, path)
    elif isinstance(node, np.ndarray) or hasattr(node, "__array__"):
        arr = np.asarray(node)
        if arr.nbytes > CHUNK_BYTES:
            flat = arr.reshape(-1)
            per = max(1, CHUNK_BYTES // arr.dtype.itemsize)
            chunks = {str(i): flat[s:s + per] for i, s in enumerate(range(0, flat.size, per))}
            shape = {str(i): d for i, d in enumerate(arr.shape)}
            _write_node(write, packer, {CHUNK_KEY: True, "shape": shape, "chunks": chunks}, path)
        else:
            _write_array(write, arr, EXT_NDARRAY, path)
    elif isinstance(node, Mapping):
        if type(node) is dict and set(map(type, node)) <= {str} and only_plain(node.values()):
            try:  # (a validation record): in one call, the same bytes as item by item
                write(packer.pack(node))
                return
            except OverflowError:  # an int beyond 64 bits: named below, with its path
                pass
        write(packer.pack_map_header(len(node)))
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"dict key {key!r} at {path!r} is a {type(key).__name__}: checkpoint "
                    "state dicts need str keys"
                )
            write(packer.pack(key))
            _write_node(write, packer, value, f"{path}/{key}" if path else key)
    elif isinstance(node, (list, tuple)):
        if only_plain(node):  # (a history's lists): in one call
            try:
                write(packer.pack(node))
                return
            except OverflowError:  # an int beyond 64 bits: named below, with its path
                pass
        write(packer.pack_array_header(len(node)))
        for i, value in enumerate(node):
            _write_node(write, packer, value, f"{path}/{i}" if path else str(i))
    else:
        raise TypeError(
            f"cannot store a {type(node).__module__}.{type(node).__qualname__} at "
            f"{path or '<root>'!r}: checkpoint state holds None, bool, int, float, str, bytes, "
            "numpy arrays and scalars, lists and str-keyed dicts (give the object a "
            "state_dict() that returns those)"
        )


class _Writable(Protocol):
    """What ``write_tree`` writes into: a binary file, or a wrapper of one."""

    def write(self, data: bytes | memoryview, /) -> object: ...


def write_tree(fileobj: _Writable, tree: Any) -> None:
    """Streams ``tree`` into ``fileobj`` as msgpack, one leaf at a time."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    _write_node(fileobj.write, packer, tree, "")


def encode(tree: Any) -> bytes:
    """Returns the msgpack encoding of ``tree`` (see :func:`write_tree`)."""
    import io

    buf = io.BytesIO()
    write_tree(buf, tree)
    return buf.getvalue()


# --------------------------------------------------------------------------- reading


def _array_from_ext(code: int, payload: bytes) -> Any:
    try:
        head = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as err:  # any msgpack failure is a corrupt file, reported below
        raise CheckpointCorruptError(f"malformed array header ({err})") from None
    if not (isinstance(head, list) and len(head) == 3):
        raise CheckpointCorruptError("malformed array header (expected [shape, dtype, data])")
    shape, dtype_name, data = head
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointCorruptError(f"malformed array shape {shape!r}")
    if not isinstance(dtype_name, str) or not isinstance(data, bytes):
        raise CheckpointCorruptError("malformed array header (dtype or data of the wrong type)")
    dtype = dtype_from_name(dtype_name)
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise CheckpointCorruptError(
            f"array of shape {tuple(shape)} {dtype_name} needs {expected} bytes, "
            f"the file holds {len(data)}"
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(tuple(shape)).copy()  # copy: writable, owns data
    return arr[()] if code == EXT_NPSCALAR else arr


def _ext_hook(code: int, payload: bytes) -> Any:
    if code not in (EXT_NDARRAY, EXT_NPSCALAR):
        raise CheckpointCorruptError(f"unknown msgpack extension type {code}")
    return _array_from_ext(code, payload)


def _unchunk(node: dict, path: str) -> np.ndarray:
    try:
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
            raise TypeError("chunks are not flat arrays")
        return np.concatenate(chunks).reshape(shape)
    except Exception as err:
        raise CheckpointCorruptError(f"malformed chunked array at {path!r} ({err})") from None


def _finish(tree: Any) -> Any:
    """Checks keys and joins chunked arrays, iteratively (input depth is not trusted)."""
    if isinstance(tree, dict) and CHUNK_KEY in tree:
        return _unchunk(tree, "<root>")
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict) and not isinstance(key, str):
                raise CheckpointCorruptError(f"non-string dict key {key!r} at {path or '<root>'!r}")
            child = f"{path}/{key}" if path else str(key)
            if isinstance(value, dict) and CHUNK_KEY in value:
                node[key] = _unchunk(value, child)
            elif isinstance(value, (dict, list)):
                stack.append((value, child))
    return tree


def decode(data: bytes | bytearray, *, max_bytes: int = DEFAULT_MAX_BYTES,
           source: str = "state") -> dict:
    """Parses a msgpack state without unpickling anything.

    Args:
      data: the bytes of a state file.
      max_bytes: refuse input larger than this.
      source: what to call the input in error messages (usually its file name).

    Returns:
      The state as nested dicts and lists of Python scalars and numpy arrays.

    Raises:
      CheckpointCorruptError: ``data`` is too large, truncated or malformed, or is not a dict.
    """
    if len(data) > max_bytes:
        raise CheckpointCorruptError(
            f"{source}: {len(data)} bytes is more than the limit of {max_bytes} bytes "
            "(pass a larger max_bytes if the file is trusted to be this large)"
        )
    try:
        tree = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               ext_hook=_ext_hook)
    except CheckpointCorruptError as err:
        raise CheckpointCorruptError(f"{source}: {err}") from None
    except (msgpack.exceptions.ExtraData, ValueError) as err:
        kind = "truncated" if "incomplete" in str(err).lower() else "malformed"
        raise CheckpointCorruptError(f"{source}: {kind} msgpack data ({err})") from None
    except Exception as err:  # StackError, FormatError, TypeError, ...: never leak them
        raise CheckpointCorruptError(
            f"{source}: malformed msgpack data ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(tree, dict):
        raise CheckpointCorruptError(
            f"{source}: expected a msgpack map at the top level, found {type(tree).__name__}"
        )
    try:
        return _finish(tree)
    except CheckpointCorruptError as err:
        raise CheckpointCorruptError(f"{source}: {err}") from None
