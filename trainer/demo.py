"""The embedded default: tiny FLUX-shaped models in the real file layouts and a small generated dataset, trained
into a LoRA on the CPU in about a minute.

    python -m trainer.demo [--output DIR] [--steps N] [--tokenizers DIR]

Writes the LoRA, a labelled loss curve (loss_curve.png) and labelled before/after previews (before_after.png), and
says where and what each shows. The tiny models have random weights: the previews show the pipeline working, not
art; the falling loss is the evidence that training worked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")
NUM_REPEATS, BATCH_SIZE, RESOLUTION = 2, 2, 64
PROMPT = "a red circle on a white background"
SAMPLE_SEED, SAMPLE_STEPS = 7, 8
MEAN_WINDOW = 8  # steps in the loss curve's running mean


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


def font(size: int):
    """Pillow's built-in font at `size` pixels (Pillow >= 10.1 with FreeType), else its small fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow 10.0 has no size; no FreeType means no scalable font
        return ImageFont.load_default()


def wrap(draw, text: str, face, width: float) -> list[str]:
    """Greedy word wrap of `text` to lines no wider than `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=face) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def line_height(face) -> int:
    return face.getbbox("Ag")[3] + 4


def put(draw, x: float, y: float, text: str, face, anchor: str = "lt", fill="black") -> None:
    """Text placed by its box: anchor 'l'/'m'/'r' horizontally and 't'/'m'/'b' vertically (Pillow's own anchors
    work for scalable fonts only, and the bitmap fallback must line up too)."""
    box = draw.textbbox((0, 0), text, font=face)
    width, height = box[2] - box[0], box[3] - box[1]
    x -= box[0] + {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    y -= box[1] + {"t": 0, "m": height / 2, "b": height}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=face)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (multiples of 1, 2 or 5 times a power of ten) between low and high."""
    span = (high - low) or abs(high) or 1.0
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def running_mean(values: list[float], window: int = MEAN_WINDOW) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def loss_summary(losses: list[float]) -> tuple[int, float, float]:
    """n, and the mean loss of the first and of the last n steps (a fifth of the run each)."""
    n = max(1, len(losses) // 5)
    return n, sum(losses[:n]) / n, sum(losses[-n:]) / n


def loss_curve(losses: list[float], path: Path, width: int = 720, height: int = 420) -> Path:
    """The loss of each step (grey) and its running mean (blue), with labelled axes and a legend, drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, label, title = font(13), font(15), font(17)
    left, top, right, bottom = 78, 44, width - 24, height - 62
    mean = running_mean(losses)
    low, high = min(losses), max(losses)
    pad = ((high - low) or 1.0) * 0.05
    low, high = low - pad, high + pad
    last_step = len(losses)

    def x_of(step: float) -> float:
        return left + (right - left) * (step - 1) / max(1, last_step - 1)

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    n, first, last = loss_summary(losses)
    draw.text((left, 12), f"training loss over {last_step} steps: {first:.3f} -> {last:.3f} (mean of the first / "
              f"last {n})", fill="black", font=title)
    for value in nice_ticks(low, high):  # y axis: grid lines and values
        y = y_of(value)
        draw.line((left, y, right, y), fill=(232, 232, 232))
        draw.line((left - 5, y, left, y), fill="black")
        put(draw, left - 8, y, f"{value:g}", small, "rm")
    steps = [s for s in nice_ticks(1, last_step) if s >= 1]
    if not steps or steps[0] - 1 > (steps[1] - steps[0] if len(steps) > 1 else 0) / 2:
        steps.insert(0, 1)
    for step in steps:  # x axis: step numbers
        x = x_of(step)
        draw.line((x, bottom, x, bottom + 5), fill="black")
        put(draw, x, bottom + 8, f"{step:g}", small, "mt")
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.line([(x_of(i + 1), y_of(v)) for i, v in enumerate(losses)], fill=(150, 150, 150), width=1)
    draw.line([(x_of(i + 1), y_of(v)) for i, v in enumerate(mean)], fill=(30, 80, 220), width=3)
    put(draw, (left + right) / 2, height - 12, "step", label, "mb")
    word = Image.new("L", (int(draw.textlength("loss", font=label)) + 4, line_height(label)), 0)
    ImageDraw.Draw(word).text((2, 0), "loss", fill=255, font=label)
    word = word.rotate(90, expand=True)
    y0 = int((top + bottom - word.height) / 2)
    image.paste((0, 0, 0), (14, y0, 14 + word.width, y0 + word.height), word)
    entries = (((150, 150, 150), 1, "loss at each step"), ((30, 80, 220), 3, f"running mean of {MEAN_WINDOW} steps"))
    box_w = 44 + max(draw.textlength(text, font=small) for _, _, text in entries)
    box_h = 10 + len(entries) * line_height(small)
    bx, by = right - box_w - 10, top + 10
    draw.rectangle((bx, by, bx + box_w, by + box_h), fill="white", outline=(180, 180, 180))
    for k, (colour, thickness, text) in enumerate(entries):
        y = by + 6 + k * line_height(small) + line_height(small) / 2
        draw.line((bx + 8, y, bx + 34, y), fill=colour, width=thickness)
        put(draw, bx + 40, y, text, small, "lm")
    image.save(path)
    return path


def side_by_side(before: Path, after: Path, path: Path, *, before_step: int, after_step: int, prompt: str,
                 settings: str, note: str, scale: int = 4) -> Path:
    """The two previews enlarged side by side, labelled 'before' / 'after' with their steps, under the prompt and
    over a note that says what they can and cannot show."""
    from PIL import Image, ImageDraw

    a, b = Image.open(before).convert("RGB"), Image.open(after).convert("RGB")
    panel_w, panel_h = a.width * scale, a.height * scale
    margin, gap = 14, 16
    width = 2 * panel_w + gap + 2 * margin
    small, label, big = font(13), font(15), font(20)
    canvas = Image.new("RGB", (width, 2000), "white")
    draw = ImageDraw.Draw(canvas)
    y = margin
    for line in wrap(draw, f'prompt: "{prompt}"', label, width - 2 * margin):
        draw.text((margin, y), line, fill="black", font=label)
        y += line_height(label)
    draw.text((margin, y), settings, fill=(90, 90, 90), font=small)
    y += line_height(small) + 8
    panels = ((a, "before", f"step {before_step}: no training yet"),
              (b, "after", f"step {after_step}: with the trained LoRA"))
    for k, (picture, word, caption) in enumerate(panels):
        x = margin + k * (panel_w + gap)
        draw.text((x, y), word, fill="black", font=big)
        draw.text((x, y + line_height(big)), caption, fill=(60, 60, 60), font=small)
        canvas.paste(picture.resize((panel_w, panel_h), Image.Resampling.NEAREST),
                     (x, y + line_height(big) + line_height(small) + 4))
    y += line_height(big) + line_height(small) + 4 + panel_h + 10
    for line in wrap(draw, note, small, width - 2 * margin):
        draw.text((margin, y), line, fill="black", font=small)
        y += line_height(small)
    canvas.crop((0, 0, width, y + margin)).save(path)
    return path


def mean_difference(before: Path, after: Path) -> float:
    """Mean absolute difference of two images per pixel and channel, on the 0-255 scale."""
    from PIL import Image, ImageChops, ImageStat

    a, b = Image.open(before).convert("RGB"), Image.open(after).convert("RGB")
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def before_and_after(samples: list[tuple[int, Path]], last_step: int) -> tuple[tuple[int, Path], tuple[int, Path]]:
    """The preview of step 0 (before training) and the one of the last step (the end-of-run preview). A run that
    made no such pair has nothing to compare: said, never papered over with one preview shown twice."""
    before = next(((step, path) for step, path in samples if step == 0), None)
    after = next(((step, path) for step, path in reversed(samples) if step == last_step), None)
    if before is None or after is None or last_step == 0:
        made = ", ".join(f"step {step}" for step, _ in samples) or "none"
        raise RuntimeError(f"demo: expected previews at step 0 and at the last step {last_step}; made: {made}")
    return before, after


def plan(steps: int) -> str:
    """The arithmetic from the dataset to the step count, in words (one bucket: every demo image is 64x64)."""
    images = len(COLOURS) * len(SHAPES)
    per_epoch = images * NUM_REPEATS
    batches = math.ceil(per_epoch / BATCH_SIZE)
    return (f"{images} images x {NUM_REPEATS} repeats = {per_epoch} per epoch, batch {BATCH_SIZE} -> {batches} steps "
            f"per epoch, {steps} steps = {steps / batches:g} epochs")


def demo_config(out: Path, files: dict[str, Path], tokenizers: dict[str, Path], steps: int):
    """The run's TrainConfig; writes its dataset TOML and prompt file into `out`. Every path is absolute, so the TOML
    (whose relative image_dir would resolve against the working folder, as in sd-scripts) works from any folder."""
    from .config import TrainConfig
    from .flow import FlowConfig
    from .lora import LoRAConfig

    out = out.resolve()
    toml = out / "dataset.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\nflip_aug = false\n\n[[datasets]]\n'
                    f'resolution = {RESOLUTION}\nbatch_size = {BATCH_SIZE}\n\n  [[datasets.subsets]]\n'
                    f'  image_dir = {json.dumps((out / "dataset").as_posix())}\n'
                    f'  num_repeats = {NUM_REPEATS}\n', encoding="utf-8")
    prompts = out / "prompts.txt"
    prompts.write_text(f"{PROMPT} --w {RESOLUTION} --h {RESOLUTION} --d {SAMPLE_SEED} --s {SAMPLE_STEPS} --g 1.0\n",
                       encoding="utf-8")
    return TrainConfig.from_flags(
        pretrained_model_name_or_path=str(files["flux"]), clip_l=str(files["clip_l"]), t5xxl=str(files["t5xxl"]),
        ae=str(files["ae"]), clip_l_tokenizer=str(tokenizers["clip_l"]), t5xxl_tokenizer=str(tokenizers["t5xxl"]),
        t5xxl_max_token_length=32, device="cpu", dataset_config=str(toml),
        network=LoRAConfig(network_dim=8, network_alpha=8, network_train_unet_only=True),
        flow=FlowConfig(guidance_scale=1.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
        learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=5, max_train_steps=steps, seed=42,
        cache_latents=True, cache_text_encoder_outputs=True, output_dir=str(out), output_name="demo_lora",
        save_precision="bf16", sample_prompts=str(prompts), sample_at_first=True, sample_at_end=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="folder for the tiny models and results")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--tokenizers", help="folder holding clip_l/ and t5xxl/ tokenizer folders")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    from .console import ConsoleReporter
    from .events import Finished, Samples
    from .loop import train
    from .models.tiny import write_model_set

    start = time.perf_counter()
    out = Path(args.output).resolve()
    tokenizers, tokenizer_note = find_tokenizers(args.tokenizers, out)
    files = write_model_set(out / "models")
    write_dataset(out / "dataset", RESOLUTION)
    print(f"demo: tiny FLUX.1 models with random weights in {out / 'models'}, {len(COLOURS) * len(SHAPES)} "
          f"captioned images in {out / 'dataset'}; {tokenizer_note}")
    print(f"demo: training a rank-8 LoRA on the CPU: {plan(args.steps)}")

    class Collecting(ConsoleReporter):
        def __init__(self) -> None:
            super().__init__()
            self.samples: list[tuple[int, Path]] = []
            self.finished: Finished | None = None

        def emit(self, event) -> None:
            super().emit(event)
            if isinstance(event, Samples):
                self.samples += [(event.step, Path(p)) for p in event.paths]
            if isinstance(event, Finished):
                self.finished = event

    reporter = Collecting()
    train(demo_config(out, files, tokenizers, args.steps), reporter)
    finished = reporter.finished
    losses = list(finished.losses)
    n, first, last = loss_summary(losses)
    (before_step, before), (after_step, after) = before_and_after(reporter.samples, finished.steps)
    fell = last < first
    verdict = (f"the loss fell from {first:.3f} to {last:.3f}" if fell else
               f"the loss did not fall ({first:.3f} -> {last:.3f}): training did not make progress")
    curve = loss_curve(losses, out / "loss_curve.png")
    note = ("The tiny models have random weights, so neither picture can look like the prompt: they show the whole "
            "pipeline running (text encoders, transformer with the LoRA, autoencoder). "
            + (f"The evidence that training worked is the loss, which fell from {first:.3f} to {last:.3f} "
               "(loss_curve.png)." if fell else f"Here {verdict} (loss_curve.png)."))
    previews = side_by_side(before, after, out / "before_after.png", before_step=before_step, after_step=after_step,
                            prompt=PROMPT, settings=f"{RESOLUTION}x{RESOLUTION} pixels, seed {SAMPLE_SEED}, "
                            f"{SAMPLE_STEPS} sampling steps, shown 4x enlarged", note=note)
    difference = mean_difference(before, after)
    rows = [
        (finished.lora.name, "the trained LoRA (rank 8, bf16, kohya format); it fits the tiny models only"),
        (curve.name, f"the loss at each step (grey) and its running mean over {MEAN_WINDOW} steps (blue)"),
        (previews.name, f'"{PROMPT}" sampled at step {before_step} (before) and step {after_step} (after)'),
        ("sample/", "the same two previews as the trainer wrote them, at their real size"),
        ("demo_lora_metrics.jsonl", "step, epoch, loss and learning rate of every step, one JSON line each"),
        ("dataset.toml", "the dataset config; its paths are absolute, so it works from any folder"),
        ("dataset/", f"the {len(COLOURS) * len(SHAPES)} generated training images with their captions (.txt)"),
        ("models/", "the tiny models: random weights in the real FLUX.1 file layouts"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print("what happened:")
    print(f"  data:      {plan(len(losses))}")
    judged = "falling, the evidence that training worked" if fell else "not falling: no evidence that training worked"
    print(f"  loss:      {first:.3f} (mean of steps 1-{n}) -> {last:.3f} (mean of steps {len(losses) - n + 1}-"
          f"{len(losses)}): {judged}")
    print("  previews:  the tiny models have random weights, so the previews are noise, not a red circle: they show")
    print("             the pipeline working (prompt -> text encoders -> transformer + LoRA -> autoencoder -> image).")
    print(f"             Step {before_step} (before) and step {after_step} (after) differ by {difference:.1f}/255 "
          "per pixel on average: " + ("the LoRA changes the output." if difference > 0 else
                                      "the LoRA did not change the output."))
    print(f"files, in {out}{os.sep}")
    for name, what in rows:
        print(f"  {name:<{width}}  {what}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
