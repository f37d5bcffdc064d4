"""Saving under failure: a full disk keeps the previous file and leaves no temporary, a killed save's temporary is
cleaned up, rotation matches names literally, files get the umask's mode, the metrics log is cut back on resume."""

import errno
import json
import os
import stat
import time
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file

from trainer.atomic import atomic_path, save_safetensors
from trainer.cadence import Cadence, Moment, due
from trainer.checkpoint import Position, capture_rng, load_state, save_state
from trainer.data.npz import write_npz
from trainer.errors import SaveError
from trainer.events import SilentReporter, StepEnd
from trainer.loop import train
from trainer.metrics import MetricsLog
from trainer.saving import LoRAWriter

from trainspace import config, make_workspace

NO_SPACE = os.strerror(errno.ENOSPC)


def _disk_full(monkeypatch, folder, room: int = 100, only: str = ""):
    """A fake file system layer: writes into `folder` (to files whose path holds `only`) fill `room` bytes, then
    fail as a full disk does (ENOSPC after a partial write). Python's writes go through `os.write`; safetensors'
    `save_file` (Rust) is replaced by one that writes the same bytes through it and fails as the library does, with a
    SafetensorError carrying the OS error."""
    real = os.write
    left = [room]

    def write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = str(folder.resolve())  # no /proc: every write counts
        if not path.startswith(str(folder.resolve())) or only not in path:
            return real(fd, data)
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, NO_SPACE)
        written = real(fd, bytes(data[:left[0]]))
        left[0] -= written
        return written

    def save_file(tensors, filename, metadata=None):
        data = memoryview(safetensors.torch.save(tensors, metadata=metadata))
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while len(data):
                data = data[write(fd, data):]
        except OSError as e:
            raise safetensors.SafetensorError(f"Error while serializing: I/O error: {e.strerror} (os error "
                                              f"{e.errno})") from None
        finally:
            os.close(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _hidden_leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial", ".old")))


def _parts(seed: int = 1) -> dict:
    return {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 8)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "scheduler": {"last_epoch": 3}, **capture_rng(), "losses": [0.5, 0.4], "seed": seed}


NETWORK = {"lora_unet_x.lora_down.weight": torch.ones(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4),
           "lora_unet_x.alpha": torch.tensor(4.0)}


def test_a_lora_save_on_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "my_lora.safetensors"
    save_safetensors({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    _disk_full(monkeypatch, tmp_path)
    with pytest.raises(SaveError) as caught:
        save_safetensors({"w": torch.zeros(1000)}, path)
    message = str(caught.value)
    assert str(path) in message and NO_SPACE in message and "previous file my_lora.safetensors is intact" in message
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["my_lora.safetensors"]


def test_a_first_save_on_a_full_disk_says_nothing_was_written(tmp_path, monkeypatch):
    _disk_full(monkeypatch, tmp_path, room=10)
    with pytest.raises(SaveError, match="nothing was written under the name new.safetensors"):
        save_safetensors({"w": torch.ones(3)}, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []


def test_an_output_folder_that_is_a_file_is_a_save_error(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SaveError, match="out"):
        save_safetensors({"w": torch.ones(3)}, tmp_path / "out" / "lora.safetensors")


@pytest.mark.parametrize("full_at", ["network.safetensors", "state.safetensors", "state.json"])
def test_a_state_save_on_a_full_disk_keeps_the_previous_state_and_leaves_no_partial(tmp_path, monkeypatch, full_at):
    folder = tmp_path / "run-state"
    save_state(folder, NETWORK, _parts(), Position(4, 1, 0))
    _disk_full(monkeypatch, tmp_path, room=10, only=full_at)
    with pytest.raises(SaveError) as caught:
        save_state(folder, {k: v * 2 for k, v in NETWORK.items()}, _parts(), Position(6, 1, 2))
    message = str(caught.value)
    assert str(folder) in message and NO_SPACE in message and "previous state run-state is intact" in message
    assert _hidden_leftovers(tmp_path) == []
    monkeypatch.undo()
    network, _, position = load_state(folder)
    assert position == Position(4, 1, 0) and torch.equal(network["lora_unet_x.lora_down.weight"], torch.ones(4, 8))


def test_a_first_state_save_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    _disk_full(monkeypatch, tmp_path, only="state.safetensors")
    with pytest.raises(SaveError, match="no state was saved under the name run-state"):
        save_state(tmp_path / "run-state", NETWORK, _parts(), Position(4, 1, 0))
    assert os.listdir(tmp_path) == []


def test_a_failed_rename_puts_the_previous_state_back(tmp_path, monkeypatch):
    folder = tmp_path / "run-state"
    save_state(folder, NETWORK, _parts(), Position(4, 1, 0))
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SaveError, match="previous state run-state is intact"):
        save_state(folder, NETWORK, _parts(), Position(6, 1, 2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["run-state"]
    assert load_state(folder)[2] == Position(4, 1, 0)


def test_a_failing_save_during_training_ends_the_run_with_the_last_good_lora(tokenizer_dirs, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    out = tmp_path / "out"
    _disk_full(monkeypatch, out, only="step00000004")  # the disk is full when the step-4 LoRA is saved
    with pytest.raises(SaveError, match=NO_SPACE):
        train(config(ws, tokenizer_dirs, out, max_train_steps=6, save_every_n_steps=2), SilentReporter())
    assert load_file(out / "test_lora-step00000002.safetensors")
    assert not (out / "test_lora-step00000004.safetensors").exists() and _hidden_leftovers(out) == []


# ------------------------------------------------------------------------------------------ temporaries of a kill


def test_the_temporary_a_killed_save_left_is_removed_by_the_next_save_of_that_file(tmp_path):
    an_hour_ago = time.time() - 3600
    stale = tmp_path / ".lora.safetensors.k7_2x9qa.tmp"  # mkstemp's name, 0 bytes: killed before writing
    other_target = tmp_path / ".lora.safetensors.x.k7_2x9qa.tmp"  # belongs to lora.safetensors.x
    live = tmp_path / ".lora.safetensors.b8w1mm0z.tmp"  # newer than this process: another process is writing it
    stale_folder = tmp_path / ".lora.safetensors.0w3rt5y7.tmp"  # this trainer's: killed while writing into it
    for path in (stale, other_target, live):
        path.write_bytes(b"")
    stale_folder.mkdir()
    (stale_folder / "lora.safetensors").write_bytes(b"half a file")
    (stale_folder / ".tmpAbC123").write_bytes(b"what safetensors writes through")
    for path in (stale, other_target, stale_folder):
        os.utime(path, (an_hour_ago, an_hour_ago))
    save_safetensors({"w": torch.ones(2)}, tmp_path / "lora.safetensors")
    assert not stale.exists() and not stale_folder.exists() and other_target.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["lora.safetensors"]


def test_atomic_path_removes_its_temporary_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.npz") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ rotation


def _writer(tmp_path, name="lora"):
    session = SimpleNamespace(config=SimpleNamespace(saving=SimpleNamespace(output_dir=str(tmp_path), name=name)),
                              world=SimpleNamespace(is_main=True))
    writer = LoRAWriter(session)
    writer._save = lambda path, step, epoch, reporter: path.write_bytes(b"lora")
    return writer


def _save_due(writer, cadence, moment):
    """What the loop does with the save the cadence says is due: the LoRA, then its state folder (a stand-in)."""
    save = due(cadence, moment, writer.written).save
    writer.save(save, SilentReporter())
    if save.state:
        (writer.folder / save.state).mkdir()
        writer.state_saved(save)


@pytest.mark.parametrize("name", ["my[lora]", "a*b", "what?", "plain"])
def test_save_last_n_steps_matches_the_output_name_literally(tmp_path, name):
    writer = _writer(tmp_path, name)
    cadence = Cadence(stem=name, save_every_n_steps=2, save_last_n_steps=4, save_state=True)
    unrelated = [tmp_path / f"{name}-step00000002-copy.safetensors", tmp_path / f"{name}x-step00000002.safetensors",
                 tmp_path / f"{name}-step00000002.safetensors.bak", tmp_path / f"{name}-step2-state"]
    for path in unrelated:
        path.write_bytes(b"keep") if "." in path.name else path.mkdir()
    for step in (2, 4, 6, 8):
        _save_due(writer, cadence, Moment.after_step(step, 1))
    assert sorted(p.name for p in tmp_path.iterdir() if p not in unrelated) == [
        f"{name}-step00000004-state", f"{name}-step00000004.safetensors",
        f"{name}-step00000006-state", f"{name}-step00000006.safetensors",
        f"{name}-step00000008-state", f"{name}-step00000008.safetensors"]
    assert all(p.exists() for p in unrelated)


# ------------------------------------------------------------------------------------------ file modes


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "lora.safetensors")
        write_npz(tmp_path / "cache.npz", {"x": np.zeros(2)})
        save_state(tmp_path / "run-state", NETWORK, _parts(), Position(1, 0, 1))
        files = [tmp_path / "lora.safetensors", tmp_path / "cache.npz", *(tmp_path / "run-state").iterdir()]
    finally:
        os.umask(previous)
    assert len(files) == 6
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~umask)
                                                                            for p in files}


# ------------------------------------------------------------------------------------------ metrics on resume


def test_the_metrics_log_is_cut_back_to_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path, "run", None, warn=lambda message: None)
    for step in range(1, 11):
        log.emit(StepEnd(step, 20, 1, 0.5, 0.5, 1e-3, float(step)))
    log.file.write('{"step": 11, "epo')  # killed while writing a line
    log.close()
    log = MetricsLog(tmp_path, "run", None, warn=lambda message: None)
    assert log.truncate_after(6) == 5
    log.emit(StepEnd(7, 20, 1, 0.4, 0.45, 1e-3, 7.0))
    log.close()
    lines = (tmp_path / "run_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7]
    again = MetricsLog(tmp_path, "run", None, warn=print)
    assert again.truncate_after(7) == 0
    again.close()


def test_rotation_deletes_only_what_this_training_wrote(tmp_path):
    """An earlier run's step and epoch files and states in the same folder are not this run's to delete."""
    earlier = [tmp_path / "lora-step00000001.safetensors", tmp_path / "lora-step00000003-state",
               tmp_path / "lora-000001.safetensors", tmp_path / "lora-000001-state"]
    for path in earlier:
        path.write_bytes(b"earlier run") if path.suffix else path.mkdir()
    writer = _writer(tmp_path)
    cadence = Cadence(stem="lora", save_every_n_steps=2, save_last_n_steps=1, save_every_n_epochs=1,
                      save_last_n_epochs=1, save_state=True)
    for step in (2, 4, 6):
        _save_due(writer, cadence, Moment.after_step(step, 1))
    for epoch in (2, 3):
        _save_due(writer, cadence, Moment.epoch_end(epoch, 6, final=False))
    assert all(path.exists() for path in earlier)
    assert sorted(p.name for p in tmp_path.iterdir() if p not in earlier) == [
        "lora-000003-state", "lora-000003.safetensors", "lora-step00000006-state", "lora-step00000006.safetensors"]
    assert writer.written == ["lora-step00000006.safetensors", "lora-step00000006-state", "lora-000003.safetensors",
                              "lora-000003-state"]


def test_a_resumed_training_rotates_what_its_state_lists(tmp_path):
    cadence = Cadence(stem="lora", save_every_n_steps=2, save_last_n_steps=2)
    first = _writer(tmp_path)
    for step in (2, 4):
        _save_due(first, cadence, Moment.after_step(step, 1))
    (tmp_path / "lora-step00000003.safetensors").write_bytes(b"another run")
    resumed = _writer(tmp_path)
    resumed.adopt(first.written + ["../outside.safetensors", 7])  # what the state lists (only plain names count)
    for step in (6, 8):
        _save_due(resumed, cadence, Moment.after_step(step, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lora-step00000003.safetensors", "lora-step00000006.safetensors", "lora-step00000008.safetensors"]


class _StopAt(SilentReporter):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def emit(self, event) -> None:
        super().emit(event)
        if isinstance(event, StepEnd) and event.step == self.step:
            self.stop_requested = True


def test_rotation_across_a_resume_spares_another_runs_files(tokenizer_dirs, tmp_path):
    """Steps 1 and 3 were left by another run; this training saves every 2 steps, keeps 2, is stopped at step 4 and
    resumed: its own step 2 is rotated out after the resume (its state lists it), the other run's files never."""
    ws = make_workspace(tmp_path / "ws")
    out = tmp_path / "out"
    out.mkdir()
    foreign = [out / "r-step00000001.safetensors", out / "r-step00000003.safetensors"]
    for path in foreign:
        path.write_bytes(b"another run")
    common = dict(output_name="r", max_train_steps=6, save_every_n_steps=2, save_last_n_steps=2)
    train(config(ws, tokenizer_dirs, out, **common), _StopAt(4))
    assert (out / "r-step00000002.safetensors").is_file() and (out / "r-state").is_dir()
    train(config(ws, tokenizer_dirs, out, resume=str(out / "r-state"), **common), SilentReporter())
    assert all(path.read_bytes() == b"another run" for path in foreign)
    steps = sorted(p.name for p in out.glob("r-step*.safetensors") if p not in foreign)
    assert steps == ["r-step00000006.safetensors"]  # 2 rotated out after the resume (the stop at 4 saved r.safetensors)
