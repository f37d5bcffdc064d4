"""Write files so that a crash or a full disk never leaves a half-written file under the final name.

A file is written inside a hidden temporary folder beside its final name (`.<name>.<8 chars>.tmp/<name>`) and
renamed into place in one step. Whatever a writer makes on the way (safetensors' `save_file` writes through a
`.tmpXXXXXX` file of its own) stays inside that folder. A write that fails removes the folder and raises
`SaveError` naming the file, the reason and that the previous file under that name is intact. A temporary left by
a killed process is removed when the same target is written again by a later process. Files get the mode the
process umask gives any new file (0644 under umask 022), not the 0600 of mkstemp and safetensors.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .errors import SaveError

__all__ = ["SaveError", "atomic_path", "create_new_file", "failure_reason", "save_error", "save_safetensors",
           "write_bytes"]

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkstemp's alphabet: older temporaries match as well
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
_STARTED = time.time()  # temporaries older than this process belong to a process that is gone (or killed)
_swept: dict[Path, dict[str, list[str]]] = {}  # folder -> target name -> stale temporaries seen on the first visit
_lock = threading.Lock()
_random = random.Random()
_CHUNK = 64 << 20


def failure_reason(error: BaseException) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: ...'."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def save_error(path: Path, error: BaseException, what: str = "file", text: str | None = None) -> SaveError:
    """The SaveError for `path` (also an OSError, with the errno of `error`); `text` replaces the message."""
    if text is None:
        previous = (f"the previous {what} {path.name} is intact" if path.exists()
                    else f"nothing was written under the name {path.name}")
        text = f"{path}: the {what} could not be written ({failure_reason(error)}); {previous}"
    result = SaveError(text)
    if isinstance(error, OSError) and isinstance(result, OSError):
        result.errno = error.errno
    return result


def _stale_temporaries(folder: Path, target: str) -> list[str]:
    """Temporaries for `target` that a process before this one left in `folder` (the folder is listed once)."""
    with _lock:
        if folder not in _swept:
            found: dict[str, list[str]] = {}
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            for name in names:
                match = _TEMPORARY.fullmatch(name)
                if match:
                    found.setdefault(match["target"], []).append(name)
            _swept[folder] = found
        return _swept[folder].pop(target, [])


def remove_stale_temporaries(final: Path) -> None:
    for name in _stale_temporaries(final.parent.resolve(), final.name):
        path = final.parent / name
        try:
            if path.lstat().st_mtime >= _STARTED:  # a newer one may be a live writer in another process
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass


def _create_temporary(final: Path) -> Path:
    """Create the folder `.<name>.<8 chars>.tmp` beside `final` (a new name, mode 0777 less the umask)."""
    for _ in range(100):
        token = "".join(_random.choice(_TOKEN_CHARS) for _ in range(8))
        folder = final.with_name(f".{final.name}.{token}.tmp")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final.parent))


def _umask_mode(folder: Path) -> int:
    """The mode a new file gets under the process umask, read off a folder made with 0777 (no umask call, which
    would change the process state under other threads)."""
    return folder.stat().st_mode & 0o666


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for `path` (not yet created); on success it replaces `path` in one rename, else it
    is removed.

    An OSError while writing (disk full, read-only folder, the folder being a file, ...) becomes a `SaveError` that
    names `path` and says the previous file is intact."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        folder = _create_temporary(final)
    except OSError as e:
        raise save_error(final, e) from e
    tmp = folder / final.name
    try:
        yield tmp
        mode = _umask_mode(folder)
        if os.name != "nt" and tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException as e:
        if isinstance(e, OSError):
            raise save_error(final, e) from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to the file `path` in chunks through `os.write` (a new file gets the umask's mode)."""
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        while len(view):
            view = view[os.write(fd, view[:_CHUNK]):]
    finally:
        os.close(fd)


def create_new_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path`, which must not exist: FileExistsError (nothing written) when it does. The file appears
    complete or not at all (written beside it, then hard-linked into place: a link never replaces a file)."""
    final = Path(path)
    if final.exists():
        raise FileExistsError(errno.EEXIST, "the file exists", str(final))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = _create_temporary(final)
    except OSError as e:
        raise save_error(final, e) from e
    try:
        tmp = folder / final.name
        write_bytes(tmp, data)
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: the check above is the guard
            if final.exists():
                raise FileExistsError(errno.EEXIST, "the file exists", str(final)) from None
            os.replace(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        raise save_error(final, e) from e
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors import torch as safetensors_torch

    with atomic_path(path) as tmp:
        try:
            safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                        metadata=dict(metadata or {}))
        except OSError:
            raise
        except Exception as e:  # safetensors reports I/O errors as its own SafetensorError
            raise _as_os_error(e) from e
    return Path(path)


def _as_os_error(error: Exception) -> Exception:
    """SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)') -> OSError(28,
    'No space left on device'); any other error as it is."""
    match = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(error))
    if type(error).__name__ != "SafetensorError" or not match:
        return error
    return OSError(int(match[2]), match[1])
