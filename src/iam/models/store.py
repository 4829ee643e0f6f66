"""The model cache under ``$IAM_CACHE``: folders built once, published atomically and verified on every load.

An entry is a folder named by its key holding what its build wrote plus ``iam-manifest.json``, written last: the
source it was built from and, per file, its size, sha256 and the stat stamp (inode, mtime_ns, ctime_ns) it had
when hashed.

* **Building** happens under ``<key>.lock`` (a ``filelock.FileLock``), in a temporary folder ``<key>.partial-*``
  that is renamed into place, complete, only if nothing is there yet. Readers take no lock: a valid folder is
  never removed or replaced, so whatever they find at the key is complete. A folder that fails verification is
  first renamed into a temporary folder, then removed.
* **Verifying** on every load: the folder must hold exactly the manifest's files at their sizes, and each file
  must still carry its stamp or else hash to its sha256. Any write to a file changes its ctime, which no system
  call sets back, so a matching stamp means the bytes are the ones hashed and a load costs one ``stat`` per file;
  a file with another stamp (copied, touched, edited) is hashed, and if it still matches, its new stamp is
  recorded. A mismatch is never loaded: the folder is rebuilt from its source, or, where the source is not at
  hand, refused with a message naming the file and what to delete.
* **Interrupts**: a build's temporary data is removed on any error, on Ctrl-C and on SIGTERM (handled like Ctrl-C
  while building). After SIGKILL or a power cut it is left behind, and removed by the next load of that key: the
  lock makes a leftover decidable, since while one holds it no build of that key is alive.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..io import atomic_file, atomic_folder

MANIFEST = "iam-manifest.json"
FORMAT = 1
BLOCK = 1 << 24


def cache_root() -> Path:
    """``$IAM_CACHE``, or ``~/.cache/iam`` when it is unset or empty."""
    return Path(os.environ.get("IAM_CACHE") or Path.home() / ".cache" / "iam")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def stamp(st: os.stat_result) -> list[int]:
    """What changes whenever a file is written or replaced."""
    return [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def problem(folder: Path, source: str | None = None) -> str | None:
    """Why ``folder`` is not a verified cache entry (of ``source``, if given), or ``None`` if it is one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        built_from = manifest["source"]
    except (FileNotFoundError, NotADirectoryError):
        return f"{folder} has no {MANIFEST} (unfinished, or written before caches had manifests)"
    except (ValueError, KeyError, TypeError):
        return f"{folder / MANIFEST} is corrupt"
    if source is not None and built_from != source:
        return f"{folder} was built from {built_from}, not {source}"
    try:
        present = {p.name for p in folder.iterdir()} - {MANIFEST}
        if present != set(files):
            return f"{folder} holds {sorted(present)}, its manifest lists {sorted(files)}"
        restamped = False
        for name, entry in files.items():
            path = folder / name
            st = path.stat()
            if st.st_size != entry["size"]:
                return f"{path} has {st.st_size} bytes, not {entry['size']}"
            if stamp(st) == entry["stamp"]:
                continue
            if file_sha256(path) != entry["sha256"]:
                return f"{path} does not match its sha256 in {MANIFEST}"
            entry["stamp"], restamped = stamp(path.stat()), True
    except FileNotFoundError as err:  # removed while we looked: it failed someone else's verification
        return f"{err.filename} is missing"
    if restamped:  # verified by hashing: record the new stamps, so the next load needs only a stat
        try:
            replace_manifest(folder, manifest)
        except OSError:  # a cache we may read but not write (or a sweep took the temporary file): hashed next time
            pass
    return None


def replace_manifest(folder: Path, manifest: dict) -> None:
    """Replace a published folder's manifest atomically, through a temporary file beside the folder (one inside it
    would be an extra file to a concurrent verifier) named as a build's, so that a sweep removes a leftover."""
    fd, tmp = tempfile.mkstemp(prefix=f"{folder.name}.partial-", dir=folder.parent)  # a unique name the sweep knows
    os.close(fd)
    with atomic_file(folder / MANIFEST, Path(tmp)) as temp:
        temp.write_text(json.dumps(manifest, indent=1))
        os.chmod(temp, folder.stat().st_mode & 0o666)  # mkstemp's files are 0600


def write_manifest(folder: Path, source: str, origin: str) -> None:
    """Give every file of ``folder`` the mode the umask gives new files (some writers use 0600), flush it to disk,
    hash it, and write the manifest last."""
    mode = folder.stat().st_mode & 0o666  # folder was made by mkdir, under the umask
    files = {}
    for path in sorted(folder.iterdir()):
        os.chmod(path, mode)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path), "stamp": stamp(path.stat())}
    manifest = {"format": FORMAT, "source": source, "origin": origin, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def temporaries(dest: Path) -> list[Path]:
    """Temporary data of builds of ``dest``'s key: ``<key>.partial-*``, and the two kinds that builds before the lock
    left (``<key>.*.partial``, ``<key>.gguf.*``)."""
    key = glob.escape(dest.name)
    patterns = (f"{key}.partial-*", f"{key}.*.partial", f"{key}.gguf.*")
    return sorted({Path(p) for pattern in patterns for p in glob.glob(str(dest.parent / pattern))})


def discard(path: Path) -> None:
    """Remove a temporary folder or file, finishing the job if one interrupt cuts it short (and raising that
    interrupt after)."""
    remove = (lambda: shutil.rmtree(path, ignore_errors=True)) if path.is_dir() else (lambda: path.unlink(missing_ok=True))
    try:
        remove()
    except KeyboardInterrupt:
        remove()
        raise


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), a first SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C would, so
    that cleanup runs, and later ones are ignored; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup that follows must run to its end
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_lock(dest: Path) -> FileLock:
    """The lock that every build of ``dest``'s key holds: ``<key>.lock`` beside it."""
    return FileLock(str(dest.parent / f"{dest.name}.lock"))


@contextmanager
def locked(dest: Path, progress: bool) -> Iterator[None]:
    """Hold ``dest``'s build lock, saying so on stderr when another process holds it first."""
    lock = build_lock(dest)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"waiting for another process building {dest} ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def ensure(dest: Path, source: str, origin: str, build: Callable[[Path], None], progress: bool = True) -> Path:
    """``dest``, verified as built from ``source``; built first if it is missing or fails verification.

    ``build(out)`` writes the entry's files into the empty folder ``out``; ``out.parent`` is the build's own scratch
    folder for anything else, removed afterwards. ``origin`` names the source for people (an alias, a file).
    """
    if problem(dest, source) is None:
        if temporaries(dest):
            sweep(dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        build_lock(dest).acquire(timeout=0)  # the lock file: whether we may write here at all
    except Timeout:
        pass
    except OSError as err:
        raise ValueError(
            f"the model cache {dest.parent} is not a writable folder ({err.strerror or err}): set IAM_CACHE to one."
        ) from None
    else:
        build_lock(dest).release()
    with locked(dest, progress), sigterm_as_interrupt():
        for path in temporaries(dest):
            discard(path)
        found = problem(dest, source) if dest.exists() else None
        if dest.exists() and found is None:  # published by another process while we waited
            return dest
        scratch = Path(tempfile.mkdtemp(prefix=f"{dest.name}.partial-", dir=dest.parent))
        try:  # out: created under the umask (mkdtemp's folders are 0700); an invalid folder there is replaced
            with atomic_folder(dest, scratch / "out") as out:
                try:
                    build(out)
                except (ValueError, FileNotFoundError) as err:
                    if found is None:
                        raise
                    raise type(err)(
                        f"{found}: it is not loaded, and rebuilding it from {origin} failed: {err} Delete {dest}; the "
                        "next load rebuilds it once its source is at hand."
                    ) from err
                write_manifest(out, source, origin)
        except OSError as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(
                f"building {dest} from {origin} failed: {err.strerror or err} ({err.filename or dest.parent}); its "
                "partial data is removed. Free space there, or set IAM_CACHE to a folder with room."
            ) from None
        finally:
            discard(scratch)
    return dest


def sweep(dest: Path) -> None:
    """Remove leftovers of dead builds of ``dest``'s key, if no build of it is running."""
    lock = build_lock(dest)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return
    try:
        for path in temporaries(dest):
            discard(path)
    finally:
        lock.release()


def check_folder(folder: Path) -> None:
    """Raise ``ValueError`` if ``folder`` is a cache entry (it has a manifest) that fails verification."""
    if (folder / MANIFEST).exists() and (found := problem(folder)) is not None:
        raise ValueError(f"{found}: it is not loaded. Delete {folder}; loading its source again rebuilds it.")
