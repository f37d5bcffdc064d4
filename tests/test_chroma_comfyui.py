"""Our Chroma against ComfyUI's own (set COMFYUI_DIR; COMFYUI_PYTHON if its Python is not this one): a tiny Chroma
file in the real key layout is detected and loaded by ComfyUI with no key missing or left over, ComfyUI's Chroma
computes what ours computes (T5 mask included), and a LoRA we save in sd-scripts' layout loads in ComfyUI with
every key used and the same result."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to test against")


def test_comfyui_runs_our_chroma_file_and_lora_as_we_do(tmp_path):
    from trainer.flow import image_ids, pack_latents, text_ids, unpack_latents
    from trainer.lora import LoRAConfig, LoRANetwork, apply_lora, save_lora
    from trainer.models import load_flux
    from trainer.models.chroma import Chroma, text_key_mask
    from trainer.models.tiny_chroma import TINY_CHROMA_COMFYUI, write_chroma

    params = TINY_CHROMA_COMFYUI  # ComfyUI's fixed 344 modulation vectors: Chroma's real depth
    write_chroma(tmp_path / "chroma.safetensors", params, seed=4, metadata={"config": json.dumps(asdict(params))})
    chroma = load_flux(tmp_path / "chroma.safetensors")
    assert type(chroma) is Chroma
    config = LoRAConfig(network_dim=4, network_alpha=2, in_dims=(2, 2, 2, 2, 2), split_qkv=True)
    network = LoRANetwork.create(config, chroma)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    save_lora(network, tmp_path / "lora.safetensors")

    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 8, 12, generator=g), 7
    t5_mask = torch.arange(text)[None] < torch.tensor([[3], [7]])  # the first caption is 3 tokens, padded to 7
    keep_img = torch.ones(2, 4 * 6, dtype=torch.bool)
    inputs = {"x": x, "timesteps": torch.tensor([0.3, 0.8]), "context": torch.randn(2, text, 32, generator=g),
              "guidance": torch.zeros(2), "strength": torch.tensor(0.8),
              "key_mask": torch.cat((text_key_mask(t5_mask), keep_img), dim=1)[:, None, None, :],
              "lengths": text_key_mask(t5_mask).sum(-1)}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    run = subprocess.run([COMFYUI_PYTHON, str(REPO / "tests" / "comfyui" / "chroma_probe.py"), COMFYUI_DIR,
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    results = load_file(tmp_path / "results.safetensors")

    assert report["detected_image_model"] == "chroma" and report["model_class"] == "Chroma"
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["not_loaded"] == []
    assert report["patched_layers"] == len(network.loras)

    def ours():
        with torch.no_grad():
            out = chroma(pack_latents(x), image_ids(2, 8, 12), inputs["context"], text_ids(2, text),
                         inputs["timesteps"], None, inputs["guidance"], t5_mask)
        return unpack_latents(out, 8, 12)

    base = ours()
    assert (results["masked_base"] - base).abs().max() < 1e-4
    assert (results["trimmed_base"] - base).abs().max() < 1e-4
    apply_lora(chroma, tmp_path / "lora.safetensors", multiplier=0.8)
    with_lora = ours()
    assert (results["masked_lora"] - results["masked_base"]).abs().max() > 1e-2
    assert (results["masked_lora"] - with_lora).abs().max() < 1e-4
    assert (results["trimmed_lora"] - with_lora).abs().max() < 1e-4
