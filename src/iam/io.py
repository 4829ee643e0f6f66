"""Atomic writes: a file or a folder appears at its path complete, or not at all. Everything is written into a
temporary path beside the final one (the same file system) and renamed into place when it is whole; the temporary
data is removed in any case, so an error or an interrupt leaves what was there before."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and thread: ``.<name>.<pid>-<thread>.partial``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")


def remove(path: Path) -> None:
    """Remove a file, a symlink or a folder tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path, temp: Path | None = None) -> Iterator[Path]:
    """A temporary path to write the file into, renamed onto ``path`` when the block ends without an error.

    Parameters:
        path: the final file; an existing one is replaced in one step.
        temp: where to write meanwhile (beside ``path``); by default ``temporary(path)``.
    """
    tmp = temp or temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, temp: Path | None = None) -> None:
    """Write ``data`` (text or bytes) to ``path`` through ``atomic_file``: readers see the old file or the new one,
    never a part."""
    with atomic_file(Path(path), temp) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


@contextmanager
def atomic_folder(path: Path, temp: Path | None = None) -> Iterator[Path]:
    """A new empty temporary folder to fill, renamed to ``path`` when the block ends without an error.

    Parameters:
        path: the final folder; whatever is there (a folder, a file, a dangling symlink) is moved aside just before
            the rename and removed after it.
        temp: the temporary folder (beside ``path``, not yet existing); by default ``temporary(path)``.
    """
    tmp = temp or temporary(path)
    old = tmp.with_name(f"{tmp.name}.old")
    remove(tmp)
    tmp.mkdir()  # under the umask, as the final folder should be
    try:
        yield tmp
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if os.path.lexists(old):  # put back what was there
                os.rename(old, path)
            raise
    finally:
        remove(old)
        remove(tmp)


def check_writable(path: str | os.PathLike, what: str, file: bool = False) -> None:
    """Before any work: ``ValueError`` naming ``what`` unless ``path`` is a folder we may write in or create, or with
    ``file`` a file name (not an existing folder) in such a folder."""
    path = Path(path)
    if file:
        if path.is_dir():
            raise ValueError(f"{what} {path} is a folder: give a file name; nothing was run.")
        path = path.parent
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:  # created later: its first existing ancestor
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} is not a writable folder ({err.strerror or err}); nothing was run.") from None
