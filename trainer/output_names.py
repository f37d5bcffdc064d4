"""The names of what a run writes into its output folder, sd-scripts' scheme written once: the final LoRA
`<name>.safetensors`, step saves `<name>-stepNNNNNNNN.safetensors`, epoch saves `<name>-NNNNNN.safetensors`, a
state folder beside each (`<LoRA name without .safetensors>-state`), and `<name>_metrics.jsonl`. Pure: no torch."""

from __future__ import annotations

import re

LORA_SUFFIX = ".safetensors"
STATE_SUFFIX = "-state"
STEP_DIGITS, EPOCH_DIGITS = 8, 6


def step_lora_name(stem: str, step: int) -> str:
    return f"{stem}-step{step:0{STEP_DIGITS}d}{LORA_SUFFIX}"


def epoch_lora_name(stem: str, epoch: int) -> str:
    return f"{stem}-{epoch:0{EPOCH_DIGITS}d}{LORA_SUFFIX}"


def final_lora_name(stem: str) -> str:
    return f"{stem}{LORA_SUFFIX}"


def state_name(lora_name: str) -> str:
    """The state folder saved with a LoRA file: its name without the suffix, then "-state"."""
    return lora_name.removesuffix(LORA_SUFFIX) + STATE_SUFFIX


def metrics_name(stem: str) -> str:
    return f"{stem}_metrics.jsonl"


def step_of(name: str, stem: str, suffix: str) -> int | None:
    """N for `<stem>-stepNNNNNNNN<suffix>` exactly (a step save or its state folder), else None."""
    match = re.fullmatch(rf"{re.escape(stem)}-step(\d{{{STEP_DIGITS}}}){re.escape(suffix)}", name, flags=re.ASCII)
    return int(match.group(1)) if match else None


def lora_kind(file_name: str, stem: str) -> tuple[str, int | None] | None:
    """("final", None), ("step", N) or ("epoch", N) for a LoRA file name of `stem`; None for anything else."""
    pattern = rf"{re.escape(stem)}(?:-step(\d{{{STEP_DIGITS}}})|-(\d{{{EPOCH_DIGITS}}}))?{re.escape(LORA_SUFFIX)}"
    match = re.fullmatch(pattern, file_name, flags=re.ASCII)
    if match is None:
        return None
    if match.group(1):
        return "step", int(match.group(1))
    if match.group(2):
        return "epoch", int(match.group(2))
    return "final", None


def output_patterns(stem: str) -> list[re.Pattern]:
    """Every name a run of `stem` writes into its output folder (LoRA files, state folders with their .old/.partial
    stand-ins while they are replaced, the metrics log)."""
    n, lora, state = re.escape(stem), re.escape(LORA_SUFFIX), re.escape(STATE_SUFFIX)
    numbered = rf"(-\d{{{EPOCH_DIGITS}}}|-step\d{{{STEP_DIGITS}}})?"
    return [re.compile(p, re.ASCII) for p in (rf"{n}{numbered}{lora}", re.escape(metrics_name(stem)),
                                               rf"{n}{numbered}{state}(\.old|\.partial)?")]
