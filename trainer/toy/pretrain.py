"""Pretrain the toy FLUX family on the CPU: first the autoencoder on random flat-coloured pictures, then the FLUX
transformer (flow matching, as the trainer trains) on captioned coloured circles, squares and triangles.

    nice -n 10 python -m trainer.toy.pretrain [--out trainer/toy/weights] [--ae-steps N] [--decoder-steps N]
                                              [--flux-steps N] [--threads N]

Deterministic for a given seed, torch version and thread count. Writes flux.safetensors and ae.safetensors (float16,
BFL layouts) with how they were made in their metadata, and README.md beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path, save_safetensors
from ..config.flow import FlowConfig
from ..flow import image_ids, pack_latents, sample_sigmas, text_ids, unpack_latents
from ..models.autoencoder import AttnBlock, AutoEncoder, ResnetBlock
from ..models.flux import Flux
from ..models.loading import load_clip_l, load_t5xxl
from . import shapes
from .models import CLIP_SEED, T5_MAX_LENGTH, T5_SEED, TOY_AE, TOY_FLUX, WEIGHTS, write_text_encoders

AE_BATCH, FLUX_BATCH, VARIANTS, AE_CROP = 8, 16, 16, 16
FLOW = FlowConfig(timestep_sampling="flux_shift", model_prediction_type="raw", guidance_scale=1.0)


def to_tensor(images) -> torch.Tensor:
    """PIL pictures -> [B, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def ae_batch(rng: random.Random, size: int = shapes.SIZE) -> torch.Tensor:
    """Half random flat pictures, half named known shapes (so the named colours are drawn exactly)."""
    pictures = []
    for _ in range(AE_BATCH):
        if rng.random() < 0.5:
            pictures.append(shapes.random_picture(rng, size))
        else:
            pictures.append(shapes.named(rng.choice(list(shapes.COLOURS)), rng.choice(shapes.KNOWN_SHAPES),
                                         rng.choice(list(shapes.BACKGROUNDS)), rng.randrange(10**9), size))
    return to_tensor(pictures)


def crop(x: torch.Tensor, rng: random.Random, size: int = AE_CROP) -> torch.Tensor:
    """A random square of each batch: the autoencoder is convolutional, and a quarter of the pixels is a quarter of
    the work on a CPU."""
    top, left = rng.randrange(x.shape[2] - size + 1), rng.randrange(x.shape[3] - size + 1)
    return x[:, :, top:top + size, left:left + size]


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def skip_init(ae: AutoEncoder) -> AutoEncoder:
    """Every residual branch starts at zero, each block as its identity (or 1x1 shortcut): a shallow network that
    learns fast, which the blocks then refine."""
    for module in ae.modules():
        last = module.conv2 if isinstance(module, ResnetBlock) else module.proj_out if isinstance(
            module, AttnBlock) else None
        if last is not None:
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
    return ae


def _descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _log_every(every: int, what: str, step: int, steps: int, loss: torch.Tensor, start: float, log) -> None:
    if step % every == 0 or step == steps - 1:
        log(f"{what} step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")


def train_autoencoder(steps: int, seed: int, log) -> tuple[AutoEncoder, dict]:
    """An autoencoder trained to reproduce its input through the 16-channel latent (L1 + L2 on pixels; the
    posterior's log-variance held low so that sampling it, as latent caching does, changes little)."""
    torch.manual_seed(seed)
    ae = skip_init(AutoEncoder(TOY_AE))
    optimizer = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        x = crop(ae_batch(rng), rng)
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        out = ae.decoder(mean)
        loss = F.l1_loss(out, x) + F.mse_loss(out, x) + 1e-3 * ((logvar + 10) ** 2).mean() + 1e-4 * mean.pow(2).mean()
        _descend(optimizer, loss)
        _log_every(20, "autoencoder", step, steps, loss, start, log)
    ae.eval().requires_grad_(False)
    with torch.no_grad():  # scale and shift that give the transformer unit-variance latents, as FLUX's do
        z = torch.cat([ae.encoder(ae_batch(rng)).chunk(2, dim=1)[0] for _ in range(8)])
    config = {"scale_factor": round(1 / z.std().item(), 4), "shift_factor": round(z.mean().item(), 4)}
    ae.params = type(TOY_AE)(**{**TOY_AE.__dict__, **config})
    return ae, config


def refine_decoder(ae: AutoEncoder, steps: int, seed: int, log) -> AutoEncoder:
    """The decoder alone on whole pictures, the encoder (and so every latent the transformer learns from) fixed:
    the crops taught it colours and edges, whole pictures teach it the borders and exact flat colours."""
    decoder = ae.decoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=5e-4, weight_decay=0.0)
    rng = random.Random(seed + 1)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 5e-4)
        x = ae_batch(rng)
        with torch.no_grad():
            mean = ae.encoder(x).chunk(2, dim=1)[0]
        out = decoder(mean)
        loss = F.l1_loss(out, x) + F.mse_loss(out, x)
        _descend(optimizer, loss)
        _log_every(20, "decoder", step, steps, loss, start, log)
    ae.eval().requires_grad_(False)
    return ae


def encode_captions(captions: list[str], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """caption -> (CLIP pooled [D], T5 hidden [L, C]) as the trainer computes them (no T5 attention mask)."""
    files = write_text_encoders(folder)
    clip = load_clip_l(files["clip_l"], dtype=torch.float32, tokenizer=files["clip_l_tokenizer"])
    t5 = load_t5xxl(files["t5xxl"], dtype=torch.float32, tokenizer=files["t5xxl_tokenizer"], max_length=T5_MAX_LENGTH)
    unique = sorted(set(captions))
    with torch.no_grad():
        pooled = clip.encode(unique).float()
        ids, _ = t5.tokenize(unique)
        hidden = t5(ids).float()
    return {c: (pooled[i], hidden[i]) for i, c in enumerate(unique)}


def train_transformer(ae: AutoEncoder, steps: int, seed: int, scratch: Path, log, variants: int = VARIANTS) -> Flux:
    """FLUX flow matching on the captioned known shapes: predict noise - latents from the noisy latents."""
    data = shapes.pretraining_set(variants, seed)
    with torch.no_grad():
        latents = torch.cat([ae.encode(to_tensor([im for im, _ in data[i:i + 64]]), sample=False)
                             for i in range(0, len(data), 64)])
    text = encode_captions([c for _, c in data], scratch)
    pooled = torch.stack([text[c][0] for _, c in data])
    hidden = torch.stack([text[c][1] for _, c in data])
    log(f"transformer: {len(data)} pictures, {len(text)} captions, latents {tuple(latents.shape[1:])} "
        f"(std {latents.std().item():.2f})")
    torch.manual_seed(seed)
    flux = Flux(TOY_FLUX)
    optimizer = torch.optim.AdamW(flux.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    _, _, h, w = latents.shape
    ids, txt_ids = image_ids(FLUX_BATCH, h, w), text_ids(FLUX_BATCH, hidden.shape[1])
    guidance = torch.full((FLUX_BATCH,), FLOW.guidance_scale)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        pick = torch.randint(len(data), (FLUX_BATCH,), generator=g)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=g)
        sigmas = sample_sigmas(FLOW, torch.randn(FLUX_BATCH, generator=g), torch.rand(FLUX_BATCH, generator=g), h, w)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        out = flux(pack_latents(noisy), ids, hidden[pick], txt_ids, sigmas, pooled[pick], guidance)
        loss = F.mse_loss(unpack_latents(out, h, w), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flux.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"transformer step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return flux.eval().requires_grad_(False)


def half(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float16) for k, v in module.state_dict().items()}


def architecture(params) -> str:
    """A params dataclass as JSON (tuples as lists): what the loaders must infer from the file."""
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in params.__dict__.items()})


def command(args) -> str:
    """The command line that makes these weights again (with the same torch and thread count)."""
    reuse = f" --ae {args.ae}" if args.ae else ""
    return (f"python -m trainer.toy.pretrain --seed {args.seed} --ae-steps {args.ae_steps} --decoder-steps "
            f"{args.decoder_steps} --flux-steps {args.flux_steps} --variants {args.variants} --threads "
            f"{args.threads}{reuse}")


def provenance(args, seconds: dict[str, float]) -> dict[str, str]:
    return {"made_by": "python -m trainer.toy.pretrain", "command": command(args), "seed": str(args.seed),
            "ae_steps": str(args.ae_steps), "decoder_steps": str(args.decoder_steps),
            "flux_steps": str(args.flux_steps), "variants": str(args.variants), "threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "seconds": json.dumps(seconds),
            "data": f"autoencoder: {AE_BATCH} pictures a step, half random flat-coloured circles and polygons, half "
                    f"named shapes, {AE_CROP}x{AE_CROP} crops, then the decoder alone on whole pictures; "
                    f"transformer: {len(shapes.COLOURS)} colours x {len(shapes.KNOWN_SHAPES)} shapes "
                    f"({', '.join(shapes.KNOWN_SHAPES)}) x {len(shapes.BACKGROUNDS)} backgrounds x {args.variants} "
                    f"jittered pictures, {shapes.SIZE}x{shapes.SIZE}, batch {FLUX_BATCH}; never a {shapes.NEW_SHAPE}"}


def readme(meta: dict[str, str], config: dict) -> str:
    seconds = json.loads(meta["seconds"])
    return f"""# Toy FLUX.1 weights

Made by

    {meta['command']}

with torch {meta['torch']} on {meta['threads']} CPU thread(s) ({seconds['autoencoder']:.0f} s for the autoencoder,
{seconds['transformer']:.0f} s for the transformer). Stored in float16, in the BFL layouts of `flux1-dev.safetensors`
and `ae.safetensors`; the trainer's normal loaders read them (the transformer's sizes inferred from its tensors).
How they were made is also in each file's metadata.

- `ae.safetensors`: the FLUX autoencoder architecture with {TOY_AE.ch} base channels, channel multipliers
  {list(TOY_AE.ch_mult)} (32x32 pixels -> 16x8x8 latents), scale {config['scale_factor']}, shift
  {config['shift_factor']} (in the file's `config` metadata).
- `flux.safetensors`: the FLUX.1-dev transformer architecture, width {TOY_FLUX.hidden_size}, {TOY_FLUX.num_heads}
  heads, {TOY_FLUX.depth} double and {TOY_FLUX.depth_single_blocks} single blocks, MLP width
  {TOY_FLUX.mlp_hidden_dim}, rotary axes {list(TOY_FLUX.axes_dim)}, guidance embedding; trained by flow matching
  with FLUX's shifted timesteps, as the trainer trains.
- Text encoders: not stored. `trainer.toy.models.write_text_encoders` regenerates them: the random-weight tiny
  CLIP-L (seed {CLIP_SEED}) and T5 (seed {T5_SEED}) of `trainer/models/tiny.py` with the character-level tokenizers
  of `trainer/models/tiny_tokenizers.py`, T5 length {T5_MAX_LENGTH} (every caption whole).

Data: {meta['data']}.

Checked by `tests/test_toy_models.py`: sampled with the trainer's own sampler, the transformer draws the colour,
shape and background of each caption it was trained on.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ae-steps", type=int, default=1500)
    parser.add_argument("--decoder-steps", type=int, default=600, help="whole-picture steps for the decoder alone")
    parser.add_argument("--flux-steps", type=int, default=5000)
    parser.add_argument("--variants", type=int, default=VARIANTS, help="jittered pictures of each caption")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ae", help="reuse this trained ae.safetensors instead of training one")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return pretrain(args)
    finally:
        torch.set_num_threads(threads)


def pretrain(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def log(text: str) -> None:
        print(text, flush=True)

    start = time.perf_counter()
    if args.ae:
        from ..models.loading import load_autoencoder
        ae = load_autoencoder(args.ae, dtype=torch.float32)
        config = {"scale_factor": ae.params.scale_factor, "shift_factor": ae.params.shift_factor}
    else:
        ae, config = train_autoencoder(args.ae_steps, args.seed, log)
        ae = refine_decoder(ae, args.decoder_steps, args.seed, log)
        save_safetensors(half(ae), out / "ae.safetensors", {"config": json.dumps(config)})  # kept if the rest fails
    seconds["autoencoder"] = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        flux = train_transformer(ae, args.flux_steps, args.seed, Path(scratch), log, args.variants)
    seconds["transformer"] = time.perf_counter() - start
    meta = provenance(args, seconds)
    save_safetensors(half(ae), out / "ae.safetensors", {**meta, "config": json.dumps(config)})
    save_safetensors(half(flux), out / "flux.safetensors", {**meta, "architecture": architecture(flux.params)})
    with atomic_path(out / "README.md") as tmp:
        Path(tmp).write_text(readme(meta, config), encoding="utf-8")
    log(f"wrote {out / 'ae.safetensors'}, {out / 'flux.safetensors'} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
