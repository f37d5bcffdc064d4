"""Checking a training state folder without reading its tensors: complete and undamaged (state.json's manifest
against the safetensors headers), made for the network and optimizer this run builds, and recovered when a save
was stopped between its two renames. Every problem is a StateError that names the file and says what matches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import ModelFileError, StateError

FORMAT = 2
READABLE_FORMATS = (1, 2)
FILES = ("network.safetensors", "state.safetensors", "state.json")
REQUIRED_PARTS = ("optimizer", "scheduler", "torch_rng", "python_rng", "losses")
_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")

Shapes = Mapping[str, Sequence[int]]
Warn = Callable[[str], None]


@dataclass
class Position:
    global_step: int
    epoch: int
    next_batch: int  # index of the next batch to train in `epoch`


@dataclass
class _Checked:
    folder: Path
    document: dict
    network: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype code), from the header
    state: dict[str, tuple[tuple[int, ...], str]]


def state_error(folder: Path, text: str) -> StateError:
    return StateError(f"resume: {folder}: {text}")


def _header(folder: Path, name: str, expected: str) -> dict[str, tuple[tuple[int, ...], str]]:
    from .models.safetensors_file import SafetensorsFile

    try:
        file = SafetensorsFile(folder / name, expected)
        return {k: (tuple(int(n) for n in v["shape"]), str(v["dtype"])) for k, v in file.header.items()}
    except ModelFileError as e:
        raise StateError(f"resume: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise state_error(folder, f"{name} has a damaged safetensors header ({e})") from None


def _walk(value: Any, refs: set[str], where: str) -> None:
    """Check the structure `_encode` writes and collect the tensor names it refers to."""
    if isinstance(value, list):
        for v in value:
            _walk(v, refs, where)
    elif isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"{where}: an object with keys {sorted(value)[:4]}")
        kind, inner = next(iter(value.items()))
        if kind == "__tensor__" and isinstance(inner, str):
            refs.add(inner)
        elif kind == "__dict__" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2
                                                                    for p in inner):
            for k, v in inner:
                _walk(k, refs, where)
                _walk(v, refs, where)
        elif kind == "__tuple__" and isinstance(inner, list):
            _walk(inner, refs, where)
        elif kind == "__dtype__" and isinstance(getattr(torch, str(inner), None), torch.dtype):
            pass
        else:
            raise ValueError(f"{where}: a damaged entry {kind!r}")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ValueError(f"{where}: a value of type {type(value).__name__}")


def _part_keys(encoded: Any) -> dict[str, Any] | None:
    """The string keys of an encoded dict and their encoded values, or None if `encoded` is not one."""
    if isinstance(encoded, dict) and isinstance(encoded.get("__dict__"), list):
        return {k: v for k, v in encoded["__dict__"] if isinstance(k, str)}
    return None


def _compare(folder: Path, name: str, listed: Any, found: dict[str, tuple[tuple[int, ...], str]]) -> None:
    if not isinstance(listed, dict):
        raise state_error(folder, f"state.json: the manifest's tensor list for {name} is damaged")
    want = {k: (tuple(v.get("shape", ())), v.get("dtype")) for k, v in listed.items() if isinstance(v, dict)}
    if want == found:
        return
    missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
    differ = [k for k in sorted(set(want) & set(found)) if want[k] != found[k]]
    details = []
    if missing:
        details.append(f"{len(missing)} listed tensors are not in it (e.g. {missing[0]})")
    if extra:
        details.append(f"{len(extra)} tensors in it are not listed (e.g. {extra[0]})")
    if differ:
        k = differ[0]
        details.append(f"{len(differ)} tensors differ (e.g. {k}: {list(found[k][0])} {found[k][1]} in the file, "
                       f"{list(want[k][0])} {want[k][1]} listed)")
    same = len(set(want) & set(found)) - len(differ)
    raise state_error(folder, f"{name} does not match the manifest in state.json: {'; '.join(details)}; {same} of "
                        f"{len(want)} listed tensors match. The files come from different saves or were changed; "
                        "resume from another state or start a new run")


def _check_lora_names(folder: Path, network: dict[str, tuple[tuple[int, ...], str]]) -> None:
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (shape, _) in network.items():
        layer, _, part = key.partition(".")
        if part not in _LORA_PARTS:
            raise state_error(folder, f"network.safetensors holds '{key}', not a LoRA tensor "
                                      "(<layer>.lora_down.weight, <layer>.lora_up.weight or <layer>.alpha)")
        layers.setdefault(layer, {})[part] = shape
    for layer, parts in layers.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise state_error(folder, f"network.safetensors has no {layer}.{missing} (the layer's other tensors "
                                      "are there)")
        if len(down) < 2 or len(up) < 2 or up[1] != down[0]:
            raise state_error(folder, f"network.safetensors: {layer} has lora_down {list(down)} and lora_up "
                                      f"{list(up)}, which do not fit together (lora_up's second size must be "
                                      "lora_down's first)")


def _check_complete(folder: Path) -> _Checked:
    """Everything that can be checked without the network this run builds; reads JSON and headers only."""
    if not folder.exists():
        raise state_error(folder, "no such folder (give a state folder written with --save_state, e.g. "
                            "<output_dir>/<output_name>-state)")
    if not folder.is_dir():
        raise state_error(folder, "is a file, not a state folder (give the folder written with --save_state)")
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise StateError(f"resume: {folder} is not a state folder written by this trainer "
                         f"(missing {', '.join(missing)})")
    try:
        document = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StateError(f"resume: {folder / 'state.json'} cannot be read ({e})") from None
    if not isinstance(document, dict):
        raise state_error(folder, "state.json does not hold a training state (not a JSON object)")
    found = document.get("format")
    if found not in READABLE_FORMATS:
        newer = " (written by a newer trainer)" if isinstance(found, int) and found > FORMAT else ""
        raise StateError(f"resume: {folder} has state format {found}{newer}, this trainer reads "
                         f"{' and '.join(map(str, READABLE_FORMATS))}")
    position = document.get("position")
    fields = ("global_step", "epoch", "next_batch")
    if (not isinstance(position, dict) or set(position) != set(fields)
            or not all(type(position[f]) is int and position[f] >= 0 for f in fields)):
        raise state_error(folder, f"state.json: the position is missing or damaged ({json.dumps(position)[:200]}); "
                            "expected global_step, epoch and next_batch (whole numbers)")
    refs: set[str] = set()
    try:
        _walk(document.get("parts"), refs, "state.json parts")
    except ValueError as e:
        raise state_error(folder, f"{e}: the file is damaged") from None
    parts = _part_keys(document.get("parts"))
    if parts is None:
        raise state_error(folder, "state.json holds no parts (optimizer, scheduler, random states)")
    absent = [k for k in REQUIRED_PARTS if k not in parts]
    if absent:
        raise state_error(folder, f"state.json lacks the part(s) {', '.join(absent)} (it holds "
                            f"{', '.join(sorted(parts)) or 'none'}); the file is damaged or not from this trainer")
    optimizer = _part_keys(parts["optimizer"])
    if optimizer is None or not {"state", "param_groups"} <= set(optimizer):
        raise state_error(folder, "state.json: the optimizer part is damaged (it needs 'state' and 'param_groups')")
    for key, ok in (("torch_rng", isinstance(parts["torch_rng"], dict) and "__tensor__" in parts["torch_rng"]),
                    ("python_rng", isinstance(parts["python_rng"], dict)
                     and len(parts["python_rng"].get("__tuple__") or ()) == 3),
                    ("losses", isinstance(parts["losses"], list))):
        if not ok:
            raise state_error(folder, f"state.json: the {key} part is damaged")
    network = _header(folder, "network.safetensors", "the LoRA of a training state")
    _check_lora_names(folder, network)
    state = _header(folder, "state.safetensors", "the optimizer tensors of a training state")
    lost = sorted(refs - set(state), key=lambda k: (len(k), k))
    if lost:
        raise state_error(folder, f"state.json refers to {len(lost)} tensor(s) state.safetensors does not hold (e.g. "
                            f"{lost[0]}; it holds {len(state)}): the two files come from different saves")
    if found >= 2:
        manifest = document.get("manifest")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("network"), dict):
            raise state_error(folder, "state.json has no manifest (format 2 states always do): the file is damaged")
        _compare(folder, "network.safetensors", manifest["network"].get("tensors"), network)
        _compare(folder, "state.safetensors", manifest.get("state_tensors"), state)
        for name, size in (manifest.get("sizes") or {}).items():
            actual = (folder / name).stat().st_size
            if actual != size:
                raise state_error(folder, f"{name} is {actual} bytes, the manifest says {size}: it was changed or "
                                    "damaged after the save")
    return _Checked(folder, document, network, state)


def _rank_text(shape: Sequence[int]) -> str:
    return f"rank {shape[0]}"


def _made_with(document: dict) -> str:
    network = (document.get("manifest") or {}).get("network") or {}
    bits = [f"network_dim {network['network_dim']}" if "network_dim" in network else "",
            f"network_alpha {network['network_alpha']}" if "network_alpha" in network else ""]
    options = network.get("options") or {}
    bits += [f"{k} {v}" for k, v in options.items()
             if k not in ("network_dim", "network_alpha") and v not in (None, False, (), [], "all")]
    bits = [b for b in bits if b]
    return f" (the state was made with {', '.join(bits)})" if bits else ""


def check_network_fits(folder: Path, found: Shapes, expected: Shapes, document: dict | None = None,
                       scope: str | None = None) -> None:
    """Raise a StateError unless the LoRA tensors `found` in a state (name -> shape) are the ones this run builds
    (`expected`: name -> shape, e.g. `{k: tuple(v.shape) for k, v in network.kohya_state_dict().items()}` of a
    meta-device network). With `scope` (a name prefix such as "lora_unet_") only the tensors under it are compared,
    for an `expected` made from part of the models (a transformer-only network)."""
    found = {k: tuple(v) for k, v in found.items() if scope is None or k.startswith(scope)}
    expected = {k: tuple(v) for k, v in expected.items()}
    made_with = _made_with(document or {})
    state_layers = {k.partition(".")[0] for k in found}
    run_layers = {k.partition(".")[0] for k in expected}
    if state_layers != run_layers:
        extra, missing = sorted(state_layers - run_layers), sorted(run_layers - state_layers)
        details = []
        if extra:
            details.append(f"{len(extra)} of its layers are not built by this run (e.g. {extra[0]})")
        if missing:
            details.append(f"{len(missing)} layers this run builds are not in it (e.g. {missing[0]})")
        raise state_error(folder, f"network.safetensors holds {len(state_layers)} LoRA layers, this run builds "
                            f"{len(run_layers)}: {' and '.join(details)}; {len(state_layers & run_layers)} layers "
                            f"match{made_with}. Resume with the network options the state was made with (layers "
                            "trained, text encoders, split_qkv) or start a new run")
    absent = sorted(set(expected) - set(found))
    if absent:
        raise state_error(folder, f"network.safetensors lacks {absent[0]} (and {len(absent) - 1} more), which this run "
                            "builds; the state is damaged or from another trainer")
    differ = sorted((k for k in expected if found[k] != expected[k]),
                    key=lambda k: (not k.endswith(".lora_down.weight"), found[k][:1], k))
    if not differ:
        return
    k = differ[0]
    have, want = found[k], expected[k]
    if k.endswith(".lora_down.weight") and len(have) == len(want) and have[1:] == want[1:]:
        raise state_error(folder, f"network.safetensors holds {_rank_text(have)} LoRA layers ({k.partition('.')[0]}: "
                            f"{list(have)}) but this run builds {_rank_text(want)} ({list(want)}){made_with}; the "
                            f"{len(run_layers)} layer names match. Resume with --network_dim {have[0]} (and the "
                            "per-layer dims the state was made with) or start a new run")
    raise state_error(folder, f"network.safetensors: {k} has shape {list(have)} but this run builds {list(want)} "
                        f"({len(differ)} tensors differ{made_with}): the state was made for another model or other "
                        "network options; resume with those or start a new run")


def _position_key(document: dict) -> tuple[int, int, int]:
    p = document["position"]
    return p["global_step"], p["epoch"], p["next_batch"]


def resolve_state_folder(folder: Path) -> tuple[Path, str | None]:
    """The folder to resume from and, when it is not `folder`, a sentence saying which one and why.

    `folder` missing with a complete `<folder>.partial` and/or `<folder>.old` beside it means a save was killed
    between its two renames: the newer complete one of the two (by its position) is used."""
    folder = Path(folder)
    if folder.exists():
        return folder, None
    candidates = []
    for suffix in (".partial", ".old"):
        candidate = folder.with_name(folder.name + suffix)
        if candidate.is_dir():
            try:
                candidates.append((_position_key(_check_complete(candidate).document), suffix == ".partial",
                                   candidate))
            except StateError:
                continue
    if not candidates:
        return folder, None
    candidates.sort(reverse=True)
    key, _, chosen = candidates[0]
    other = (f"; {candidates[1][2].name} holds step {candidates[1][0][0]}" if len(candidates) > 1 else "")
    return chosen, (f"resume: {folder} is missing (a save was stopped between its two renames); resuming from "
                    f"{chosen.name}, the newest complete state beside it, at step {key[0]}{other}")


def checked_state(folder: Path, expected: Shapes | None, optimizer: str | None, warn: Warn | None,
           scope: str | None) -> _Checked:
    folder, note = resolve_state_folder(Path(folder))
    if note and warn is not None:
        warn(note)
    checked = _check_complete(folder)
    if expected is not None:
        check_network_fits(folder, {k: v[0] for k, v in checked.network.items()}, expected, checked.document, scope)
    made_by = (checked.document.get("manifest") or {}).get("optimizer")
    if optimizer is not None and made_by is not None and made_by != optimizer:
        raise state_error(folder, f"the optimizer state is {made_by}'s but this run uses {optimizer}; resume with "
                            f"--optimizer_type {made_by} or start a new run")
    return checked


def check_state_folder(folder: Path, expected: Shapes | None = None, optimizer: str | None = None,
                       warn: Warn | None = None, scope: str | None = None) -> dict:
    """The state document of `folder` after checking, from JSON and the safetensors headers only, that the folder
    holds a whole state this trainer wrote; with `expected` (LoRA tensor name -> shape of the network this run
    builds; `scope`: see `check_network_fits`) that the LoRA fits, with `optimizer` (the canonical --optimizer_type
    name) that the optimizer state is that optimizer's. A missing folder whose save was interrupted is recovered (see
    `resolve_state_folder`; `warn` gets the note). Every problem is a StateError naming the file."""
    return checked_state(folder, expected, optimizer, warn, scope).document


def state_position(folder: Path) -> Position:
    """Where the state in `folder` (or the one recovered for it) stands, from state.json."""
    return Position(**_check_complete(resolve_state_folder(Path(folder))[0]).document["position"])


def network_shapes(network) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the LoRA tensors `network` saves (works on a meta-device network)."""
    return {k: tuple(v.shape) for k, v in network.kohya_state_dict().items()}


