"""Run under ComfyUI's Python: build ComfyUI's own Flux in a given tiny config, apply a LoRA with ComfyUI's own
loader, and write what came out. Used by tests/test_comfyui_integration.py; reads and writes files only.

    python lora_probe.py COMFYUI_DIR WORK_DIR
WORK_DIR holds flux.safetensors (BFL keys, config in metadata), lora.safetensors, te_keys.json (the text-encoder
state-dict keys of ComfyUI's Flux CLIP, for the key-map check) and inputs.safetensors; results.safetensors and
results.json are written there.
"""

import json
import logging
import sys
from pathlib import Path

comfy_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(comfy_dir))

import comfy.cli_args  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

comfy.cli_args.args.cpu = True  # as `main.py --cpu`: this probe runs where there may be no GPU

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402

not_loaded = []


class Capture(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "lora key not loaded" in message:
            not_loaded.append(message.split(": ", 1)[-1])


logging.getLogger().addHandler(Capture())

with safe_open(str(work / "flux.safetensors"), "pt") as f:
    config = json.loads(f.metadata()["config"])
unet_config = {"image_model": "flux", "in_channels": config["in_channels"] // 4, "patch_size": 2,
               "out_channels": config["out_channels"] // 4, "vec_in_dim": config["vec_in_dim"],
               "context_in_dim": config["context_in_dim"], "hidden_size": config["hidden_size"],
               "mlp_ratio": config["mlp_ratio"], "num_heads": config["num_heads"], "depth": config["depth"],
               "depth_single_blocks": config["depth_single_blocks"], "axes_dim": config["axes_dim"],
               "theta": config["theta"], "qkv_bias": config["qkv_bias"], "guidance_embed": config["guidance_embed"]}
model_config = comfy.supported_models.Flux(unet_config)
model_config.set_inference_dtype(torch.float32, None)
model = model_config.get_model({})
model.load_model_weights(load_file(work / "flux.safetensors"), "")
patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

lora = load_file(work / "lora.safetensors")


class TextEncoderKeys(torch.nn.Module):
    """Stands in for ComfyUI's Flux CLIP object: the key map only reads state-dict names."""

    def state_dict(self, *args, **kwargs):
        return {k: torch.zeros(1) for k in json.loads((work / "te_keys.json").read_text())}


key_map = comfy.lora.model_lora_keys_unet(model, {})
key_map = comfy.lora.model_lora_keys_clip(TextEncoderKeys(), key_map)
loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)

inputs = load_file(work / "inputs.safetensors")


def predict(m):
    with torch.no_grad():
        return m.diffusion_model(inputs["x"], inputs["timesteps"], inputs["context"], y=inputs["y"],
                                 guidance=inputs["guidance"])


base = predict(patcher.model)
unet_lora = {k: v for k, v in lora.items() if k.startswith("lora_unet_")}
patched, _ = comfy.sd.load_lora_for_models(patcher, None, unet_lora, float(inputs["strength"]), 0.0)
patched.patch_model()
with_lora = predict(patched.model)
save_file({"base": base.contiguous(), "with_lora": with_lora.contiguous()}, str(work / "results.safetensors"))
(work / "results.json").write_text(json.dumps({"not_loaded": not_loaded, "patched_layers": len(loaded)}))
