"""Fault injection for the trainer CLI, loaded at interpreter start when this folder is on PYTHONPATH.

Used by tests/test_fault_injection.py, which runs `python -m trainer ...` as a subprocess with this folder first on
PYTHONPATH. Nothing happens unless FAULT_WATCH is set. Then every write the trainer makes into the watched folders,
every rename there and every training step is an *event*, numbered from 1 in this process:

    step        trainer.step.TrainStep.forward (detail: the 0-based global step)
    metrics     trainer.metrics.MetricsLog.emit of a StepEnd (one line of <name>_metrics.jsonl)
    latent_npz  numpy.savez of a *_flux.npz latent cache
    text_npz    numpy.savez of a *_flux_te.npz text-encoder cache
    lora        safetensors.torch.save_file of a LoRA file
    state_file  safetensors.torch.save_file inside a <state>.partial folder
    json        os.write into a watched file (state.json, train_state.json, a metrics rewrite)
    replace     os.replace with a watched path (the rename of a temporary, the state folder's renames)

The hooks sit at the library seams (numpy, safetensors, os) where possible, so they follow the trainer's own code
paths. Environment:

FAULT_WATCH   folders (os.pathsep-separated) whose writes are events
FAULT_TRACE   a file; one line per event, `<n>\t<kind>\t<detail>`, and `KILL\t<n>\t<kind>\t<detail>\t<mode>`
FAULT_KILL    where to SIGKILL this process:
                `<K>:<seed>`  at the K-th event; its mode drawn from the event's modes by random.Random(seed)
                `<kind>[@<text>]:<n>:<mode>`  at the n-th event of that kind whose detail holds <text>
              modes: `before` (nothing of the event done), `torn` (a write cut halfway: the temporary holds a truncated
              file; a metrics line half written), `after` (a rename done, what follows it not)
FAULT_FULL    JSON {"at": kind, "nth": n, "room": bytes, "layer": "tmpfs"|"fake", "ballast": path}: at the start of
              the n-th event of `kind` the disk becomes full. `tmpfs`: the file system holding `ballast` is filled
              with that file until `room` bytes are free (real ENOSPC from the kernel). `fake`: a fake file-system
              layer: writes into the watched folders fill `room` bytes, then fail with OSError(ENOSPC) after a
              partial write, as a full disk does (safetensors' save_file fails with its SafetensorError).
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import signal

_WATCH = [os.path.realpath(p) for p in os.environ.get("FAULT_WATCH", "").split(os.pathsep) if p]
_TOKEN = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")

if _WATCH:
    import numpy
    import safetensors
    import safetensors.torch

    import trainer.metrics
    import trainer.step
    from trainer.events import StepEnd

    _real_write = os.write
    _real_open = os.open
    _real_replace = os.replace
    _real_savez = numpy.savez
    _real_save_file = safetensors.torch.save_file
    _real_emit = trainer.metrics.MetricsLog.emit
    _real_forward = trainer.step.TrainStep.forward

    _MODES = {"step": ("before",), "metrics": ("before", "torn"), "latent_npz": ("before", "torn"),
              "text_npz": ("before", "torn"), "lora": ("before", "torn"), "state_file": ("before", "torn"),
              "json": ("before", "torn"), "replace": ("before", "after")}
    _count = [0]
    _per_kind: dict[str, int] = {}
    _matched = [0]  # events matching a `<kind>@<detail>` kill point
    _kill = os.environ.get("FAULT_KILL", "")
    _full = json.loads(os.environ["FAULT_FULL"]) if os.environ.get("FAULT_FULL") else None
    _budget: list[int | None] = [None]  # bytes the fake layer still accepts; None: not full

    def _trace(line: str) -> None:
        path = os.environ.get("FAULT_TRACE")
        if path:
            fd = _real_open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _real_write(fd, (line + "\n").encode())
            finally:
                os.close(fd)

    def _watched(path) -> bool:
        try:
            real = os.path.realpath(os.fspath(path))
        except (TypeError, ValueError):
            return False
        return any(real == w or real.startswith(w + os.sep) for w in _WATCH)

    def _short(path) -> str:
        """`out/.x.safetensors.k3j2h1g0.tmp/x.safetensors` -> `x.safetensors`; a file of a state folder keeps the
        folder's name: `run-state.partial/state.json`."""
        *folders, name = os.path.realpath(os.fspath(path)).split(os.sep)
        match = _TOKEN.match(name)
        if match:
            name = match["name"]
        elif folders and _TOKEN.match(folders[-1]):
            folders.pop()
        if folders and folders[-1].endswith(".partial"):
            name = f"{folders[-1]}/{name}"
        return name

    def _fill_disk() -> None:
        room = int(_full.get("room", 0))
        if _full["layer"] == "fake":
            _budget[0] = room
            return
        ballast = _full["ballast"]
        st = os.statvfs(os.path.dirname(ballast))
        need = st.f_bavail * st.f_frsize - room
        fd = _real_open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            chunk = b"\0" * (1 << 20)
            while need > 0:
                try:
                    need -= _real_write(fd, chunk[:min(need, len(chunk))])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)
        _trace(f"FULL\t{room}\t{os.statvfs(os.path.dirname(ballast)).f_bavail}")

    def _event(kind: str, detail: str) -> str | None:
        """Count the event; fill the disk or return the kill mode when this is the event asked for."""
        _count[0] += 1
        _per_kind[kind] = _per_kind.get(kind, 0) + 1
        n = _count[0]
        _trace(f"{n}\t{kind}\t{detail}")
        if _full is not None and _full["at"] == kind and _per_kind[kind] == int(_full["nth"]) and _budget[0] is None:
            _fill_disk()
        if not _kill:
            return None
        fields = _kill.rsplit(":", 2)
        if len(fields) == 2:
            if int(fields[0]) != n:
                return None
            mode = random.Random(int(fields[1])).choice(_MODES[kind])
        else:
            want, _, part = fields[0].partition("@")
            if want != kind or part not in detail:
                return None
            _matched[0] += 1
            if _matched[0] != int(fields[1]):
                return None
            mode = fields[2]
        _trace(f"KILL\t{n}\t{kind}\t{detail}\t{mode}")
        return mode

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _charge(length: int) -> int:
        """Fake layer: how many of `length` bytes fit; raises ENOSPC when none does."""
        if _budget[0] is None:
            return length
        if _budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fits = min(length, _budget[0])
        _budget[0] -= fits
        return fits

    def _fd_path(fd: int) -> str | None:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None

    # ------------------------------------------------------------------------------------------ os.write (json)

    def write(fd, data):
        path = _fd_path(fd)
        if path is None or not _watched(path):
            return _real_write(fd, data)
        mode = _event("json", _short(path))
        if mode == "torn":
            _real_write(fd, bytes(data[:max(1, len(data) // 2)]))
            _die()
        if mode:
            _die()
        fits = _charge(len(data))
        return _real_write(fd, bytes(data[:fits]) if fits < len(data) else data)

    # ------------------------------------------------------------------------------------------ os.replace

    def replace(src, dst, *args, **kwargs):
        if not (_watched(src) or _watched(dst)):
            return _real_replace(src, dst, *args, **kwargs)
        mode = _event("replace", f"{_short(src)} -> {_short(dst)}")
        if mode == "before":
            _die()
        result = _real_replace(src, dst, *args, **kwargs)
        if mode == "after":
            _die()
        return result

    # ------------------------------------------------------------------------------------------ numpy.savez (caches)

    def savez(file, *args, **kwargs):
        path = getattr(file, "name", file)
        if not isinstance(path, (str, bytes, os.PathLike)) or not _watched(path):
            return _real_savez(file, *args, **kwargs)
        kind = "text_npz" if os.fspath(path).endswith("_te.npz") else "latent_npz"
        mode = _event(kind, _short(path))
        if mode == "before":
            _die()
        if mode is None and _budget[0] is None:
            return _real_savez(file, *args, **kwargs)
        buffer = io.BytesIO()
        _real_savez(buffer, *args, **kwargs)
        data = buffer.getvalue()
        out = file if hasattr(file, "write") else open(file, "wb")
        try:
            if mode == "torn":
                out.write(data[:len(data) // 2])
                out.flush()
                _die()
            fits = _charge(len(data))
            out.write(data[:fits])
            if fits < len(data):
                out.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            if out is not file:
                out.close()

    # ------------------------------------------------------------------------------------------ safetensors

    def save_file(tensors, filename, metadata=None):
        if not _watched(filename):
            return _real_save_file(tensors, filename, metadata=metadata)
        short = _short(filename)
        mode = _event("state_file" if "/" in short else "lora", short)
        if mode == "before":
            _die()
        if mode is None and _budget[0] is None:
            return _real_save_file(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        fd = _real_open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if mode == "torn":
                _real_write(fd, data[:len(data) // 2])
                _die()
            view = memoryview(data)
            while len(view):
                try:
                    fits = _charge(len(view))
                except OSError as e:  # as the library reports it
                    raise safetensors.SafetensorError(f"Error while serializing: I/O error: {e.strerror} (os error "
                                                      f"{e.errno})") from None
                view = view[_real_write(fd, view[:fits]):]
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------ metrics, steps

    class _ChargedFile:
        """Fake layer: the metrics log's text file, its writes charged to the room left."""

        def __init__(self, file):
            self._file = file

        def write(self, text: str) -> int:
            data = text.encode("utf-8")
            fits = _charge(len(data))
            if fits < len(data):
                self._file.write(data[:fits].decode("utf-8", "ignore"))
                self._file.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._file.write(text)

        def __getattr__(self, name):
            return getattr(self._file, name)

    def emit(self, event):
        if not isinstance(event, StepEnd) or not _watched(self.path):
            return _real_emit(self, event)
        mode = _event("metrics", str(event.step))
        if mode == "torn":
            self.file.write(f'{{"step": {event.step}, "epo')
            self.file.flush()
            _die()
        if mode:
            _die()
        if _budget[0] is not None and not isinstance(self.file, _ChargedFile):
            self.file = _ChargedFile(self.file)
        return _real_emit(self, event)

    def forward(self, batch, step):
        if _event("step", str(step)):
            _die()
        return _real_forward(self, batch, step)

    os.write = write
    os.replace = replace
    numpy.savez = savez
    safetensors.torch.save_file = save_file
    trainer.metrics.MetricsLog.emit = emit
    trainer.step.TrainStep.forward = forward
