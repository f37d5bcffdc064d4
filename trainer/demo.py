"""The embedded default: tiny FLUX-shaped models in the real file layouts and a small generated dataset, trained
into a LoRA on the CPU in about a minute.

    python -m trainer.demo [--output DIR] [--steps N] [--tokenizers DIR]

Writes the LoRA, a loss curve (loss_curve.png), before/after previews (before_after.png) and says where. The tiny
models have random weights: the previews show the pipeline working, not art.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")


def find_tokenizers(explicit: str | None, scratch: Path) -> tuple[dict[str, Path], str]:
    """Real tokenizer folders if any are at hand, else generated character-level ones."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        env = os.environ.get("FLUX_TRAINER_TOKENIZERS")
        candidates = [Path(env)] if env else []
        candidates += [REPO_ROOT / "tests" / "reference" / "tokenizers", REPO_ROOT.parents[1] / "comfy"]
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


def write_dataset(folder: Path, size: int = 64) -> list[str]:
    """Coloured shapes on white with captions naming them ('a red circle on a white background')."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            image = Image.new("RGB", (size, size), (250, 250, 250))
            draw = ImageDraw.Draw(image)
            box = (size // 5 + 2 * j, size // 5 + i, size * 4 // 5, size * 4 // 5)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
            caption = f"a {colour} {shape} on a white background"
            name = f"{colour}_{shape}"
            image.save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
            captions.append(caption)
    return captions


def loss_curve(losses: list[float], path: Path, width: int = 640, height: int = 360) -> Path:
    """Per-step loss (grey) and its running mean (blue), drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 20, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * i / max(1, len(losses) - 1)
        return x, bottom - (bottom - top) * (value - low) / span

    draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 170, 170), width=1)
    window, mean = 8, []
    for i in range(len(losses)):
        chunk = losses[max(0, i - window + 1):i + 1]
        mean.append(sum(chunk) / len(chunk))
    draw.line([point(i, v) for i, v in enumerate(mean)], fill=(30, 80, 220), width=3)
    draw.text((left, bottom + 8), f"step 1 .. {len(losses)}   loss {high:.3f} (top) .. {low:.3f} (bottom)",
              fill="black")
    image.save(path)
    return path


def side_by_side(before: Path, after: Path, path: Path, scale: int = 4) -> Path:
    from PIL import Image

    a, b = Image.open(before), Image.open(after)
    out = Image.new("RGB", (a.width * scale * 2 + 8, a.height * scale), "white")
    out.paste(a.resize((a.width * scale, a.height * scale), Image.Resampling.NEAREST), (0, 0))
    out.paste(b.resize((b.width * scale, b.height * scale), Image.Resampling.NEAREST), (a.width * scale + 8, 0))
    out.save(path)
    return path


def demo_config(out: Path, files: dict[str, Path], tokenizers: dict[str, Path], steps: int):
    from .config import TrainConfig
    from .flow import FlowConfig
    from .lora import LoRAConfig

    toml = out / "dataset.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\nflip_aug = false\n\n[[datasets]]\nresolution = 64\n'
                    f'batch_size = 2\n\n  [[datasets.subsets]]\n  image_dir = "{(out / "dataset").as_posix()}"\n'
                    '  num_repeats = 2\n', encoding="utf-8")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --d 7 --s 8 --g 1.0\n", encoding="utf-8")
    return TrainConfig(
        pretrained_model_name_or_path=str(files["flux"]), clip_l=str(files["clip_l"]), t5xxl=str(files["t5xxl"]),
        ae=str(files["ae"]), clip_l_tokenizer=str(tokenizers["clip_l"]), t5xxl_tokenizer=str(tokenizers["t5xxl"]),
        t5xxl_max_token_length=32, device="cpu", dataset_config=str(toml),
        network=LoRAConfig(network_dim=8, network_alpha=8, network_train_unet_only=True),
        flow=FlowConfig(guidance_scale=1.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
        learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=5, max_train_steps=steps, seed=42,
        cache_latents=True, cache_text_encoder_outputs=True, output_dir=str(out), output_name="demo_lora",
        save_precision="bf16", sample_prompts=str(prompts), sample_at_first=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="folder for the tiny models and results")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--tokenizers", help="folder holding clip_l/ and t5xxl/ tokenizer folders")
    args = parser.parse_args(argv)

    from .cli import ConsoleReporter
    from .events import Finished, Samples
    from .loop import train
    from .models.tiny import write_model_set

    start = time.perf_counter()
    out = Path(args.output)
    tokenizers, tokenizer_note = find_tokenizers(args.tokenizers, out)
    files = write_model_set(out / "models")
    write_dataset(out / "dataset")
    print(f"tiny FLUX.1 models in {out / 'models'}, {len(COLOURS) * len(SHAPES)} captioned images in "
          f"{out / 'dataset'}; {tokenizer_note}")

    class Collecting(ConsoleReporter):
        def __init__(self) -> None:
            super().__init__()
            self.samples: list = []
            self.finished: Finished | None = None

        def emit(self, event) -> None:
            super().emit(event)
            if isinstance(event, Samples):
                self.samples += list(event.paths)
            if isinstance(event, Finished):
                self.finished = event

    reporter = Collecting()
    train(demo_config(out, files, tokenizers, args.steps), reporter)
    losses = list(reporter.finished.losses)
    first, last = losses[: len(losses) // 5], losses[-len(losses) // 5:]
    curve = loss_curve(losses, out / "loss_curve.png")
    previews = side_by_side(reporter.samples[0], reporter.samples[-1], out / "before_after.png")
    print(f"loss {sum(first) / len(first):.3f} over the first {len(first)} steps -> {sum(last) / len(last):.3f} over "
          f"the last {len(last)}")
    print(f"LoRA:          {reporter.finished.lora}")
    print(f"loss curve:    {curve}")
    print(f"before/after:  {previews}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
