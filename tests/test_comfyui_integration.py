"""Against a real ComfyUI (set COMFYUI_DIR; COMFYUI_PYTHON if its Python is not this one)."""

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
PACK = "flux_lora_trainer"

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to test against")


def test_pack_loads_in_comfyui_without_errors(tmp_path):
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    run = subprocess.run(
        [COMFYUI_PYTHON, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path),
         "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK],
        cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    loaded = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK}")]
    assert loaded, f"ComfyUI did not report loading the pack:\n{log[-4000:]}"
    assert not any("IMPORT FAILED" in line for line in loaded), "\n".join(loaded)


def test_our_lora_loads_fully_in_comfyui_and_computes_the_same(tmp_path, tiny_files):
    """ComfyUI's own Flux, in the same tiny config, with ComfyUI's own LoRA loader: every key of a LoRA we saved
    (FLUX, CLIP-L and T5 layers) is mapped, and the patched model computes what ours computes with the LoRA."""
    from trainer.atomic import save_safetensors
    from trainer.flow import image_ids, pack_latents, text_ids, unpack_latents
    from trainer.lora import LoRAConfig, LoRANetwork, apply_lora, save_lora
    from trainer.models import load_clip_l, load_flux, load_t5xxl
    from trainer.models.tiny import TINY_FLUX, flux_state_dict

    config = {**asdict(TINY_FLUX), "mlp_ratio": TINY_FLUX.mlp_hidden_dim / TINY_FLUX.hidden_size}
    save_safetensors(flux_state_dict(seed=4), tmp_path / "flux.safetensors", metadata={"config": json.dumps(config)})
    flux = load_flux(tmp_path / "flux.safetensors")
    clip = load_clip_l(tiny_files["clip_l"], dtype=torch.float32)
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32)
    cfg = LoRAConfig(network_dim=4, network_alpha=2, in_dims=(2, 2, 2, 2, 2), train_t5xxl=True, split_qkv=True)
    network = LoRANetwork.create(cfg, flux, clip, t5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    save_lora(network, tmp_path / "lora.safetensors")
    te_keys = [f"clip_l.transformer.text_model.{k}" for k in clip.model.state_dict()]
    te_keys += [f"t5xxl.transformer.{k}" for k in t5.model.state_dict()]
    (tmp_path / "te_keys.json").write_text(json.dumps(te_keys))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 12, generator=g)
    inputs = {"x": x, "timesteps": torch.tensor([0.3, 0.8]), "context": torch.randn(2, 5, 32, generator=g),
              "y": torch.randn(2, 64, generator=g), "guidance": torch.tensor([1.0, 3.5]), "strength": torch.tensor(0.8)}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    run = subprocess.run([COMFYUI_PYTHON, str(REPO / "tests" / "comfyui" / "lora_probe.py"),
                          COMFYUI_DIR, str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    results = load_file(tmp_path / "results.safetensors")

    assert report["not_loaded"] == []
    assert report["patched_layers"] == len(network.loras)

    def ours():
        with torch.no_grad():
            out = flux(pack_latents(x), image_ids(2, 8, 12), inputs["context"], text_ids(2, 5), inputs["timesteps"],
                       inputs["y"], inputs["guidance"])
        return unpack_latents(out, 8, 12)

    assert (results["base"] - ours()).abs().max() < 1e-4
    apply_lora(flux, tmp_path / "lora.safetensors", multiplier=0.8)
    assert (results["with_lora"] - results["base"]).abs().max() > 1e-2
    assert (results["with_lora"] - ours()).abs().max() < 1e-4
