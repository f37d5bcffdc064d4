"""Run under ComfyUI's Python: build ComfyUI's own Chroma in a given tiny config, load a Chroma file with
ComfyUI's loader, apply a LoRA with ComfyUI's own LoRA code, and write what came out. Used by
tests/test_chroma_comfyui.py; reads and writes files only.

    python chroma_probe.py COMFYUI_DIR WORK_DIR
WORK_DIR holds chroma.safetensors (Chroma keys, our ChromaParams as JSON in the `config` metadata),
lora.safetensors and inputs.safetensors (x, timesteps, context, guidance, key_mask [B, 1, 1, L + N], lengths,
strength). results.safetensors and results.json are written there:
  masked_base / masked_lora: the batch with the padded text and the key mask (PyTorch attention);
  trimmed_base / trimmed_lora: each sample alone with its text cut to `lengths[i]` tokens and no mask at all, as
  ComfyUI runs Chroma (its T5 tokenizer does not pad).
"""

import json
import logging
import sys
from pathlib import Path

comfy_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(comfy_dir))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # as `main.py --cpu`: this probe runs where there may be no GPU
comfy.cli_args.args.use_pytorch_cross_attention = True  # the attention that takes a boolean key mask

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

not_loaded = []


class Capture(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "lora key not loaded" in message:
            not_loaded.append(message.split(": ", 1)[-1])


logging.getLogger().addHandler(Capture())

state = load_file(work / "chroma.safetensors")
with safe_open(str(work / "chroma.safetensors"), "pt") as f:
    config = json.loads(f.metadata()["config"])
detected = comfy.model_detection.detect_unet_config(state, "")
unet_config = {"image_model": "chroma", "in_channels": config["in_channels"], "out_channels": config["out_channels"],
               "patch_size": 2, "context_in_dim": config["context_in_dim"], "hidden_size": config["hidden_size"],
               "mlp_ratio": config["mlp_hidden_dim"] / config["hidden_size"], "num_heads": config["num_heads"],
               "depth": config["depth"], "depth_single_blocks": config["depth_single_blocks"],
               "axes_dim": config["axes_dim"], "theta": config["theta"], "qkv_bias": config["qkv_bias"],
               "in_dim": config["approximator_in_dim"], "out_dim": config["hidden_size"],
               "hidden_dim": config["approximator_hidden_dim"], "n_layers": config["approximator_layers"]}
model_config = comfy.supported_models.Chroma(unet_config)
model_config.set_inference_dtype(torch.float32, None)
model = model_config.get_model({})
missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
inputs = load_file(work / "inputs.safetensors")


def predict(m):
    with torch.no_grad():
        masked = m.diffusion_model(inputs["x"], inputs["timesteps"], inputs["context"], inputs["guidance"],
                                   attention_mask=inputs["key_mask"])
        trimmed = [m.diffusion_model(inputs["x"][i:i + 1], inputs["timesteps"][i:i + 1],
                                     inputs["context"][i:i + 1, : int(n)], inputs["guidance"][i:i + 1])
                   for i, n in enumerate(inputs["lengths"])]
    return masked, torch.cat(trimmed)


masked_base, trimmed_base = predict(patcher.model)
lora = load_file(work / "lora.safetensors")
loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), comfy.lora.model_lora_keys_unet(model, {}))
patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, float(inputs["strength"]), 0.0)
patched.patch_model()
masked_lora, trimmed_lora = predict(patched.model)
save_file({"masked_base": masked_base.contiguous(), "masked_lora": masked_lora.contiguous(),
           "trimmed_base": trimmed_base.contiguous(), "trimmed_lora": trimmed_lora.contiguous()},
          str(work / "results.safetensors"))
(work / "results.json").write_text(json.dumps({
    "detected_image_model": detected.get("image_model") if detected else None,
    "model_class": type(model).__name__,
    "missing": list(missing), "unexpected": list(unexpected), "not_loaded": not_loaded,
    "patched_layers": len(loaded),
}))
