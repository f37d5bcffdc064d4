"""Every LoRA a run saved, as the train node's `checkpoints` output: the step and epoch saves and the final LoRA in
the run folder, each with the step and epoch its metadata (`ss_steps`, `ss_epoch`) records, oldest first.

Which files belong to the run: names of this output name exactly (`<name>.safetensors`, `<name>-stepNNNNNNNN`,
`<name>-NNNNNN`) whose metadata does not name another output; among them the saves of the process that wrote the
final LoRA (same `ss_training_started_at`), and, when that process resumed from a state in this run folder, every
save up to the resumed step (the earlier part of the run, however many times it was resumed). Saves of the same
step count once (the final LoRA wins over the step save of its step). A file whose header cannot be read is left
out (the run's own files are written atomically, so such a file is another program's).

Pure: standard library plus safetensors' header reader; no ComfyUI, no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from ..trainer.errors import ConfigError
from ..trainer.output_names import lora_kind


class Checkpoint(NamedTuple):
    """One saved LoRA of a run (the FLUX_TRAIN_CHECKPOINTS socket carries a tuple of these)."""
    label: str  # "step 4", "epoch 2 (step 8)", "step 12 (final)"
    step: int
    epoch: int
    path: str  # absolute path of the .safetensors file
    kind: str  # "step" | "epoch" | "final"


def read_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors header's metadata of `path` (no tensor is read); None when the header cannot be read."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                return None
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None


def _int(meta: dict[str, str], key: str) -> int | None:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return None


def _first_known(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def label(kind: str, step: int, epoch: int) -> str:
    if kind == "epoch":
        return f"epoch {epoch} (step {step})"
    return f"step {step} (final)" if kind == "final" else f"step {step}"


def _candidate(path: Path, output_name: str, step: int | None = None) -> tuple[Checkpoint, dict[str, str]] | None:
    """`path` as a checkpoint of `output_name` with its metadata, or None; `step`: the step when the metadata has
    none (the final LoRA of a --no_metadata run)."""
    named = lora_kind(path.name, output_name)
    if named is None or not path.is_file():
        return None
    kind, numbered = named
    meta = read_metadata(path)
    if meta is None or meta.get("ss_output_name", output_name) not in (output_name, ""):
        return None
    step = _first_known(_int(meta, "ss_steps"), step, numbered if kind == "step" else None)
    if step is None:  # an epoch save without training metadata (--no_metadata): its step is unknown
        return None
    epoch = _first_known(_int(meta, "ss_epoch"), numbered if kind == "epoch" else None, 0)
    return Checkpoint(label(kind, step, epoch), step, epoch, str(path.resolve()), kind), meta


def list_checkpoints(run_dir: str | Path, output_name: str, final: str | Path | None = None,
                     final_step: int | None = None, resumed_step: int | None = None) -> tuple[Checkpoint, ...]:
    """The run's saved LoRAs in `run_dir`, by step. `final`: the run's final LoRA (default
    `<run_dir>/<output_name>.safetensors`); `final_step`: its step when its metadata lacks one (--no_metadata);
    `resumed_step`: the step of the state this run resumed from, when that state is in `run_dir` (see
    `resumed_step_in`)."""
    run_dir = Path(run_dir)
    final = Path(final) if final is not None else run_dir / f"{output_name}.safetensors"
    last = _candidate(final, output_name, final_step) if final.parent.resolve() == run_dir.resolve() else None
    if last is None:
        raise ConfigError(f"checkpoints: {final} is not a LoRA of output_name {output_name!r} with readable "
                          "metadata in the run folder; expected the run's final LoRA")
    started = last[1].get("ss_training_started_at")
    found = {last[0].step: last[0]}
    for path in sorted(run_dir.glob("*.safetensors")):
        item = _candidate(path, output_name)
        if item is None or item[0].kind == "final" or item[0].step > last[0].step:
            continue
        checkpoint, meta = item
        this_process = meta.get("ss_training_started_at") == started  # both None: --no_metadata, cannot tell
        earlier_part = resumed_step is not None and checkpoint.step <= resumed_step
        if (this_process or earlier_part) and checkpoint.step not in found:
            found[checkpoint.step] = checkpoint
    return tuple(found[step] for step in sorted(found))


def resumed_step_in(run_dir: str | Path, state_folder: str | Path | None) -> int | None:
    """The step of the state a run resumed from, when that state is one of `run_dir`'s (else None: the saves of a
    run resumed from another folder are in that folder)."""
    if state_folder is None:
        return None
    folder = Path(state_folder)
    if folder.resolve().parent != Path(run_dir).resolve():
        return None
    try:  # sd-scripts' train_state.json, written beside state.json in every state folder
        return int(json.loads((folder / "train_state.json").read_text(encoding="utf-8"))["current_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def parse_strengths(text: str) -> tuple[float, ...]:
    """"0.5, 1.0" -> (0.5, 1.0); empty -> (1.0,)."""
    parts = [p.strip() for p in re.split(r"[,\s;]+", text or "") if p.strip()]
    if not parts:
        return (1.0,)
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"strengths: {part!r} is not a number; expected numbers separated by commas, "
                              "e.g. '0.5, 1.0'") from None
        if value != value or abs(value) > 100:
            raise ConfigError(f"strengths: {part!r} is out of range; expected numbers from -100 to 100")
        values.append(value)
    return tuple(values)


def cell_labels(checkpoints, strengths) -> list[str]:
    """One label per (checkpoint, strength), checkpoint-major: the grid's row is the checkpoint."""
    return [f"{c.label}, strength {s:g}" for c in checkpoints for s in strengths]
