"""Training state for --save_state / --resume, written without pickle.

A state folder holds `network.safetensors` (the LoRA at full precision), `state.safetensors` + `state.json` (the
optimizer, scheduler, loss scaler, random generators and position, tensors and the rest kept apart) and sd-scripts'
`train_state.json`. Loading reads JSON and safetensors only, so a state folder from anywhere cannot run code.

`state.json` (format 2) also holds a manifest: what the state was made with (the LoRA's ranks, alphas and options,
the optimizer) and every tensor of both safetensors files with its shape, dtype and the files' sizes. A
folder is checked against it from the safetensors headers alone (no tensor is read), so a damaged or mismatched
state is refused in a second, before any model loads, with a message saying what is wrong and what matches.
Format 1 folders (no manifest) are still read.

A state folder is saved as `<folder>.partial`, then moved into place (`<folder>` -> `<folder>.old`, `.partial` ->
`<folder>`, `.old` removed). A kill between the two renames leaves no `<folder>`: resuming from it takes the newer
complete one of `.partial` and `.old` and says so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file

from .atomic import (
    SaveError,
    atomic_path,
    failure_reason,
    remove_stale_temporaries,
    save_error,
    save_safetensors,
    write_bytes,
)
from .errors import TrainerError
from .state_check import (
    FILES,
    FORMAT,
    Position,
    Shapes,
    Warn,
    check_state_folder,
    checked_state,
    network_shapes,
    resolve_state_folder,
    state_error,
    state_position,
)

# the state's checks live in state_check.py; callers may take them from here with the rest of the state API
__all__ = ["Position", "save_state", "load_state", "restoring", "capture_rng", "restore_rng", "check_state_folder",
           "network_shapes", "state_position"]

_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
                torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot store a {type(value).__name__} in the training state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
    return value


# ---------------------------------------------------------------------------------------------------- saving


def _tensor_list(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": _DTYPE_CODES.get(v.dtype, str(v.dtype))} for k, v in tensors.items()}


def _one_or_all(values: set) -> Any:
    ordered = sorted(values)
    return ordered[0] if len(ordered) == 1 else ordered


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _manifest(network_tensors: Mapping[str, torch.Tensor], state_tensors: Mapping[str, torch.Tensor],
              folder: Path, optimizer: str | None, network_config: Mapping[str, Any] | None) -> dict:
    ranks = {int(v.shape[0]) for k, v in network_tensors.items() if k.endswith(".lora_down.weight") and v.ndim}
    alphas = {float(v.float().reshape(-1)[0]) for k, v in network_tensors.items()
              if k.endswith(".alpha") and v.numel() == 1}
    return {
        "network": {"network_dim": _one_or_all(ranks), "network_alpha": _one_or_all(alphas),
                    "layers": len({k.partition(".")[0] for k in network_tensors}),
                    "options": _jsonable(dict(network_config)) if network_config is not None else None,
                    "tensors": _tensor_list(network_tensors)},
        "optimizer": optimizer,
        "state_tensors": _tensor_list(state_tensors),
        "sizes": {name: (folder / name).stat().st_size for name in ("network.safetensors", "state.safetensors")},
    }


def _write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        write_bytes(tmp, json.dumps(value).encode("utf-8"))


def save_state(folder: Path, network_tensors: dict[str, torch.Tensor], parts: dict[str, Any], position: Position,
               optimizer: str | None = None, network_config: Mapping[str, Any] | None = None) -> Path:
    """Write a complete state folder next to its final name, then move it into place.

    `optimizer` (its --optimizer_type name, `canonical_optimizer(config.optimizer.optimizer_type)`) and
    `network_config` (the LoRA options, `asdict(config.network)`) go into the manifest. A save
    that fails (disk full, read-only folder) removes what it wrote, leaves the previous state under `folder` as it
    was and raises `SaveError`."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    writing = staging.name
    try:
        if not folder.exists():  # a save stopped between its renames: its newest complete state takes the name
            recovered, _ = resolve_state_folder(folder)
            if recovered != folder:
                os.replace(recovered, folder)
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed save
        staging.mkdir(parents=True)
        writing = "network.safetensors"
        save_safetensors(network_tensors, staging / writing)
        tensors: dict[str, torch.Tensor] = {}
        encoded = _encode(parts, tensors)
        tensors = tensors or {"empty": torch.zeros(0)}
        writing = "state.safetensors"
        save_safetensors(tensors, staging / writing)
        writing = "train_state.json"
        _write_json(staging / writing, {"current_epoch": position.epoch, "current_step": position.global_step})
        writing = "state.json"  # last: a folder holding it is complete
        _write_json(staging / writing, {"format": FORMAT, "position": position.__dict__,
                                        "manifest": _manifest(network_tensors, tensors, staging, optimizer,
                                                              network_config),
                                        "parts": encoded})
        writing = f"the rename of {staging.name} to {folder.name}"
        _move_into_place(staging, folder)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(e, (OSError, SaveError)):
            raise
        cause = e.__cause__ if isinstance(e, SaveError) and e.__cause__ is not None else e
        previous = (f"the previous state {folder.name} is intact" if (folder / "state.json").is_file()
                    else f"no state was saved under the name {folder.name}")
        raise save_error(folder, cause, text=f"{folder}: the training state could not be written ("
                                             f"{failure_reason(cause)}, at {writing}); {previous} and no "
                                             f"{staging.name} folder was left") from e
    return folder


def _move_into_place(staging: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    if not folder.exists():
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)  # older than what is now in place
        return
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except OSError:
        os.replace(old, folder)  # the previous state back under its name
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- checking


def _put_back(folder: Path, found: Path) -> Path:
    """A state recovered from `<folder>.partial` / `<folder>.old` (a save stopped between its two renames) takes its
    name again and the other leftover goes, so that neither stays beside the run's files. Returns where it is."""
    if found != folder:
        try:
            os.replace(found, folder)
        except OSError:
            return found  # a read-only folder: resume from where it is
        for suffix in (".partial", ".old"):
            shutil.rmtree(folder.with_name(folder.name + suffix), ignore_errors=True)
    for name in (*FILES, "train_state.json"):  # a save killed after a file's rename, before its clean-up
        remove_stale_temporaries(folder / name)
    return folder


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(folder / name)
    except Exception as e:  # safetensors raises its own error types
        raise state_error(folder, f"{name} cannot be read ({failure_reason(e)})") from None


def load_state(folder: Path, expected: Shapes | None = None, optimizer: str | None = None,
               warn: Warn | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], Position]:
    """The LoRA tensors, the parts and the position of a state folder, after `check_state_folder` (same
    arguments; `expected` is the whole network here). Never a raw KeyError or RuntimeError: every problem is a
    StateError naming the file."""
    checked = checked_state(folder, expected, optimizer, warn, None)
    folder = _put_back(Path(folder), checked.folder)
    network = _load_tensors(folder, "network.safetensors")
    tensors = _load_tensors(folder, "state.safetensors")
    try:
        parts = _decode(checked.document["parts"], tensors)
        position = Position(**checked.document["position"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise state_error(folder, f"state.json cannot be decoded ({type(e).__name__}: {e})") from None
    return network, parts, position


@contextmanager
def restoring(folder: Path, what: str) -> Iterator[None]:
    """Turn an error while giving a part of a state to its owner (`optimizer.load_state_dict(...)`) into a
    StateError naming the folder and the part."""
    try:
        yield
    except TrainerError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise state_error(Path(folder), f"the {what} state does not fit this run ({type(e).__name__}: {e}); the state "
                                  "was made with other options or is damaged") from None


def capture_rng() -> dict[str, Any]:
    """The global random states a resumed run must continue from (torch, Python, CUDA when present)."""
    states: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(parts: dict[str, Any], folder: Path | None = None) -> None:
    with restoring(Path(folder or "state.json"), "random generator"):
        torch.set_rng_state(parts["torch_rng"])
        random.setstate(parts["python_rng"])
        if "cuda_rng" in parts and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(parts["cuda_rng"])
