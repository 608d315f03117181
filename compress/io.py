"""Files written so that a crash never leaves half of one: the project's one atomic write.

Every artifact (TFLite files, results.csv, JSON, weights) is written to a temporary name in the
folder of its final path and renamed over it (`os.replace` is atomic on POSIX within one file
system), so a reader, or a run resumed after a kill, sees the old file or the new one, never a
partial one. Only the standard library: the fresh measuring processes import this.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` (same extension, e.g. `.h5` for Keras) that replaces
    `path` when the block ends without an exception; removed otherwise. Folders are created.

        with atomic_path("stage/weights.h5") as tmp:
            model.save_weights(tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` (bytes, or text as UTF-8) to `path` atomically, flushed to disk first."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())


def _plain(obj: Any) -> Any:
    """NumPy scalars and arrays as Python values, other objects (paths) as strings."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_plain) + "\n")


def file_sizes(path_or_bytes: str | os.PathLike | bytes) -> dict:
    """Raw and gzip (level 9) size of a file or of bytes, the usual proxy for download size."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    return {"size_bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9))}
