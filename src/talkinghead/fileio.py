"""Atomic writes: outputs appear whole or not at all.

Writers create the content under a hidden temporary name in the target's folder (:func:`temp_file`,
:func:`temp_dir`), then :func:`publish` renames it onto the target (same file system, so the rename is
atomic). ``tempfile.mkstemp`` / ``mkdtemp`` make *private* entries (0600 / 0700), and some writers (safetensors)
recreate the file privately; an mp4, an avatar or a report keeping that mode would, written by root in a
container, be unreadable to everyone else. :func:`publish` gives it the mode any new file or folder gets
(0666 / 0777 minus the process umask).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def temp_file(path: Path, suffix: str = ".tmp") -> Path:
    """An empty hidden file beside ``path`` (named ``.NAME.*SUFFIX``).

    ``suffix`` matters to writers that pick the format from the name (``.mp4``, ``.png``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def temp_dir(path: Path) -> Path:
    """An empty hidden folder beside ``path`` (named ``.NAME.*``)."""
    path = Path(path)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` (a file or folder from the functions above) default permissions, then rename it to ``path``."""
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask())
    os.replace(tmp, path)


def write_atomic(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """``write(tmp)`` into a :func:`temp_file` beside ``path`` (its folder created), then :func:`publish` it;
    the temporary file is removed whatever happens (errors, OSError included, reach the caller)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path, suffix)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
