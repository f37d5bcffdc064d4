"""--model_type (sd-scripts' flux_train_network.py: flux or chroma) and what Chroma needs of the other options.

Torch-free. Chroma has no CLIP-L (--clip_l is not needed), attends only to its caption's T5 tokens
(--apply_t5_attn_mask, which sd-scripts requires for it) and trains with --guidance_scale 0.0 (sd-scripts' guide).
"""

from __future__ import annotations

from typing import Mapping

from ..errors import ConfigError

MODEL_TYPES = ("flux", "chroma")
CHROMA_GUIDANCE_SCALE = 0.0
CHROMA_SAMPLE_GUIDANCE = 0.0  # a preview prompt without --g: Chroma's embedded guidance off (sd-scripts' guide)


def check_model_type(value: object) -> str:
    if value not in MODEL_TYPES:
        raise ConfigError(f"model_type: expected one of {', '.join(MODEL_TYPES)}, not {value!r}")
    return str(value)


def required_model_files(model_type: str) -> tuple[str, ...]:
    """The model-file options a run needs: Chroma reads no CLIP-L."""
    check_model_type(model_type)
    return ("pretrained_model_name_or_path", "t5xxl", "ae") if model_type == "chroma" else \
        ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae")


def chroma_fields(given: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """For --model_type chroma: the option values to set over what the user gave (`given`: option -> value, only
    those set) and one line for each thing the user should know. Never changes an explicit --guidance_scale (a value
    other than 0.0 is noted by TrainConfig.advice(), for every front end)."""
    fields: dict[str, object] = {}
    notes: list[str] = []
    if not given.get("apply_t5_attn_mask"):
        fields["apply_t5_attn_mask"] = True
        notes.append("--model_type chroma: --apply_t5_attn_mask is on (Chroma attends to its caption's T5 tokens "
                     "only; sd-scripts requires it)")
    if given.get("guidance_scale") is None:  # one given is kept; TrainConfig.advice() says if it is not 0.0
        fields["guidance_scale"] = CHROMA_GUIDANCE_SCALE
        notes.append("--model_type chroma: --guidance_scale 0.0 (Chroma trains with its guidance input at 0)")
    if given.get("clip_l"):
        notes.append("--model_type chroma: --clip_l is not used (Chroma has no CLIP-L)")
    return fields, notes

