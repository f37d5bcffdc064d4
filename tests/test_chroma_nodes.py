"""The models node recognises a Chroma transformer from its file: no CLIP-L is checked or passed on, and the output
says model_type chroma; a FLUX file's output is what it was. Runs against ComfyUI's V3 API (the snapshot in
.comfyui/ComfyUI, or $COMFYUI_DIR); skipped, with one line saying why, where ComfyUI is absent."""

import os
import sys
from pathlib import Path

import pytest
from packimport import REPO, pack

from trainer.models.tiny_chroma import write_chroma

COMFYUI = Path(os.environ.get("COMFYUI_DIR", REPO / ".comfyui" / "ComfyUI"))
HAVE_COMFYUI = (COMFYUI / "comfy_api" / "latest" / "__init__.py").is_file()
pytestmark = pytest.mark.skipif(not HAVE_COMFYUI, reason=f"ComfyUI not found at {COMFYUI} (set COMFYUI_DIR or run "
                                                         "bash ../shared/comfyui/setup.sh .comfyui)")


@pytest.fixture
def models_node(tiny_files):
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))  # appended: ComfyUI's top-level names must not shadow anything of ours
    import folder_paths

    folder = tiny_files["flux"].parent
    if not (folder / "chroma.safetensors").exists():
        write_chroma(folder / "chroma.safetensors")
    for key in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(key, str(folder))
    return pack("nodes.models").FluxLoraTrainerModels


def run(node, transformer, clip_l):
    return node.execute(transformer=transformer, clip_l=clip_l, t5xxl="t5xxl_fp16.safetensors", ae="ae.safetensors",
                        checkpoint="(none)", base_precision="bf16", t5xxl_fp8=False)


def test_a_chroma_file_gives_model_type_chroma_and_no_clip_l(models_node, tiny_files):
    out = run(models_node, "chroma.safetensors", clip_l="ae.safetensors")  # not a CLIP-L: Chroma never reads it
    (files,) = out.args
    assert files.models.model_type == "chroma" and files.models.clip_l is None
    assert files.models.pretrained_model_name_or_path == str(tiny_files["flux"].parent / "chroma.safetensors")
    assert out.ui["text"][0].startswith("Chroma: 2 double + 2 single blocks, hidden 64")
    assert "CLIP-L not used" in out.ui["text"][0]
    with pytest.raises(ValueError, match="t5xxl"):  # the slots Chroma uses are still checked
        models_node.execute(transformer="chroma.safetensors", clip_l="clip_l.safetensors", t5xxl="ae.safetensors",
                            ae="ae.safetensors", checkpoint="(none)", base_precision="bf16", t5xxl_fp8=False)


def test_a_flux_file_gives_what_it_gave(models_node, tiny_files):
    out = run(models_node, "flux.safetensors", clip_l="clip_l.safetensors")
    (files,) = out.args
    assert files.models.model_type == "flux" and files.models.clip_l == str(tiny_files["clip_l"])
    assert out.ui["text"][0].startswith("FLUX.1 dev: 2 double + 2 single blocks") and "CLIP-L" not in out.ui["text"][0]
