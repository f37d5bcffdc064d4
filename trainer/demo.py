"""The embedded default: tiny FLUX-shaped models in the real file layouts, run end to end on the CPU.

    python -m trainer.demo [--output DIR] [--tokenizers DIR]

Until the training loop lands, this writes the tiny models, loads them through the same loaders the 12B files
use, encodes a caption and an image, runs one transformer prediction and decodes it, and says where it all went.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_tokenizers(explicit: str | None, scratch: Path) -> tuple[dict[str, Path], str]:
    """Real tokenizer folders if any are at hand, else generated character-level ones."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        env = os.environ.get("FLUX_TRAINER_TOKENIZERS")
        candidates = [Path(env)] if env else []
        candidates += [REPO_ROOT.parent / "shared" / "tokenizers", REPO_ROOT.parents[1] / "comfy"]
    for base in candidates:
        found = {"clip_l": base / "clip_l", "t5xxl": base / "t5xxl"}
        if base.name == "comfy":  # running inside ComfyUI's custom_nodes: use ComfyUI's own copies
            found = {"clip_l": base / "sd1_tokenizer", "t5xxl": base / "text_encoders" / "t5_tokenizer"}
        if (found["clip_l"] / "vocab.json").is_file() and (found["t5xxl"] / "tokenizer.json").is_file():
            return found, f"real tokenizers from {base}"
    if explicit:
        raise SystemExit(f"--tokenizers {explicit}: expected clip_l/vocab.json and t5xxl/tokenizer.json inside")
    from .models.tiny_tokenizers import write_tokenizers

    return write_tokenizers(scratch / "tokenizers"), "generated character-level tokenizers (no real ones found)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="folder for the tiny models and results")
    parser.add_argument("--tokenizers", help="folder holding clip_l/ and t5xxl/ tokenizer folders")
    args = parser.parse_args(argv)

    import torch

    from .flow import image_ids, pack_latents, text_ids, unpack_latents
    from .models import load_autoencoder, load_clip_l, load_flux, load_t5xxl
    from .models.tiny import write_model_set

    start = time.perf_counter()
    out = Path(args.output)
    tokenizers, tokenizer_note = find_tokenizers(args.tokenizers, out)
    files = write_model_set(out / "models")
    print(f"tiny models written to {out / 'models'} ({', '.join(p.name for p in files.values())}); {tokenizer_note}")

    clip = load_clip_l(files["clip_l"], dtype=torch.float32, tokenizer=tokenizers["clip_l"])
    t5 = load_t5xxl(files["t5xxl"], dtype=torch.float32, tokenizer=tokenizers["t5xxl"], max_length=64)
    ae = load_autoencoder(files["ae"])
    flux = load_flux(files["flux"])

    caption = "a red circle on a blue background"
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1
    with torch.no_grad():
        pooled = clip.encode(caption)
        txt, mask = t5.encode(caption)
        latents = ae.encode(image, generator=generator)
        h, w = latents.shape[-2:]
        noise = torch.randn(latents.shape, generator=generator)
        sigma = torch.tensor([0.5])
        noisy = (1 - sigma) * latents + sigma * noise
        prediction = flux(pack_latents(noisy), image_ids(1, h, w), txt, text_ids(1, txt.shape[1]), sigma, pooled,
                          guidance=torch.tensor([1.0]))
        decoded = ae.decode(noisy - sigma * unpack_latents(prediction, h, w))
    print(f"caption -> CLIP-L pooled {list(pooled.shape)}, T5 {list(txt.shape)} ({int(mask.sum())} real tokens)")
    print(f"image {list(image.shape)} -> latents {list(latents.shape)} -> FLUX prediction {list(prediction.shape)} "
          f"-> decoded {list(decoded.shape)}")
    print(f"forward pass of the tiny FLUX.1 stack done in {time.perf_counter() - start:.1f} s "
          "(training on the embedded dataset arrives with the training loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
