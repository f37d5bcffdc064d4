"""--model_type chroma's option rules (trainer/config/model_type.py): what sd-scripts requires or its guide
recommends for Chroma, as field values and lines for the user; torch-free."""

import pytest

from trainer.config.model_type import check_model_type, chroma_fields, required_model_files
from trainer.errors import ConfigError


def test_model_type_is_flux_or_chroma():
    assert check_model_type("chroma") == "chroma" and check_model_type("flux") == "flux"
    with pytest.raises(ConfigError, match="model_type: expected one of flux, chroma, not 'sd3'"):
        check_model_type("sd3")


def test_chroma_needs_no_clip_l():
    assert required_model_files("chroma") == ("pretrained_model_name_or_path", "t5xxl", "ae")
    assert required_model_files("flux") == ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae")


def test_chroma_turns_the_t5_mask_on_and_guidance_to_zero_when_not_given():
    fields, notes = chroma_fields({})
    assert fields == {"apply_t5_attn_mask": True, "guidance_scale": 0.0}
    assert len(notes) == 2 and "--apply_t5_attn_mask is on" in notes[0] and "--guidance_scale 0.0" in notes[1]


def test_chroma_keeps_what_the_user_set_and_says_what_does_not_fit():
    assert chroma_fields({"apply_t5_attn_mask": True, "guidance_scale": 0.0}) == ({}, [])
    fields, notes = chroma_fields({"apply_t5_attn_mask": True, "guidance_scale": 3.5, "clip_l": "clip_l.safetensors"})
    assert fields == {}
    assert notes == ["--model_type chroma: --clip_l is not used (Chroma has no CLIP-L)"]  # guidance: advice() says it
