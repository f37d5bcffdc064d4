"""The embedded default: a toy FLUX.1 family (a tiny autoencoder and transformer in the real architectures and file
layouts, pretrained on captioned coloured circles, squares and triangles; trainer/toy/) learns a shape it never saw,
a five-pointed star called "sks", as a LoRA on the CPU in a minute or two.

    python -m trainer.demo [--output DIR] [--steps N]

Writes the LoRA, a labelled loss curve (loss_curve.png) and labelled before/after previews of the same prompts and
seed (before_after.png): the trained prompt, and an unrelated one that the LoRA should leave as the base model drew
it. Measures both against the procedural pictures and says what they show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")  # write_dataset's shapes (the tiny random-weight models' dataset of other tests)
CONCEPT = "sks"  # the word the LoRA learns: a five-pointed star (toy.shapes.NEW_SHAPE), which the toy never saw
CONCEPT_COLOURS = ("red", "green", "blue", "yellow")
CONCEPT_BACKGROUNDS = ("white", "black")
NUM_REPEATS, BATCH_SIZE, RESOLUTION = 2, 2, 32
PROMPT_COLOUR, PROMPT_BACKGROUND = "red", "white"
OTHER = ("blue", "square", "gray")  # nothing to do with the concept, and a background its pictures never have
PROMPT = f"a {PROMPT_COLOUR} {CONCEPT} on a {PROMPT_BACKGROUND} background"
OTHER_PROMPT = f"a {OTHER[0]} {OTHER[1]} on a {OTHER[2]} background"
SAMPLE_SEED, SAMPLE_STEPS = 7, 16
SCALE = 6  # the 32x32 previews enlarged in before_after.png
MEAN_WINDOW = 8  # steps in the loss curve's running mean
DEFAULT_STEPS, LEARNING_RATE, RANK = 400, 4e-3, 16


def write_dataset(folder: Path, size: int = 64) -> list[str]:
    """Coloured circles and squares on white with captions naming them ('a red circle on a white background'): the
    small dataset the tests train the random-weight tiny models on (trainer/models/tiny.py)."""
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


def concept_caption(colour: str, background: str) -> str:
    return f"a {colour} {CONCEPT} on a {background} background"


def write_concept_dataset(folder: Path) -> list[str]:
    """The new concept: a star in each colour on each concept background, captioned 'a red sks on a white
    background', each at its own jittered place and size."""
    from .toy import shapes

    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i, colour in enumerate(CONCEPT_COLOURS):
        for j, background in enumerate(CONCEPT_BACKGROUNDS):
            name = f"{colour}_{CONCEPT}_on_{background}"
            picture = shapes.named(colour, shapes.NEW_SHAPE, background, seed=1000 + 10 * i + j, size=RESOLUTION)
            picture.save(folder / f"{name}.png")
            captions.append(concept_caption(colour, background))
            (folder / f"{name}.txt").write_text(captions[-1] + "\n", encoding="utf-8")
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


def comparison(rows: list[tuple[str, Path, Path]], path: Path, *, before_step: int, after_step: int, settings: str,
               note: str, scale: int = SCALE) -> Path:
    """Each row's two previews enlarged side by side under its prompt: 'before' (step `before_step`, the base model)
    on the left, 'after' (step `after_step`, with the LoRA) on the right; the settings on top and a note under them
    that says what they show."""
    from PIL import Image, ImageDraw

    pictures = [(prompt, Image.open(a).convert("RGB"), Image.open(b).convert("RGB")) for prompt, a, b in rows]
    panel_w, panel_h = pictures[0][1].width * scale, pictures[0][1].height * scale
    margin, gap = 14, 16
    width = 2 * panel_w + gap + 2 * margin
    small, label, big = font(13), font(15), font(20)
    canvas = Image.new("RGB", (width, 4000), "white")
    draw = ImageDraw.Draw(canvas)
    y = margin
    for line in wrap(draw, settings, small, width - 2 * margin):
        draw.text((margin, y), line, fill=(90, 90, 90), font=small)
        y += line_height(small)
    y += 6
    headers = (("before", f"step {before_step}: the base model"), ("after", f"step {after_step}: with the LoRA"))
    for k, (word, caption) in enumerate(headers):
        x = margin + k * (panel_w + gap)
        draw.text((x, y), word, fill="black", font=big)
        draw.text((x, y + line_height(big)), caption, fill=(60, 60, 60), font=small)
    y += line_height(big) + line_height(small) + 6
    for prompt, before, after in pictures:
        for line in wrap(draw, f'prompt: "{prompt}"', label, width - 2 * margin):
            draw.text((margin, y), line, fill="black", font=label)
            y += line_height(label)
        for k, picture in enumerate((before, after)):
            canvas.paste(picture.resize((panel_w, panel_h), Image.Resampling.NEAREST),
                         (margin + k * (panel_w + gap), y + 2))
        y += panel_h + 12
    for line in wrap(draw, note, small, width - 2 * margin):
        draw.text((margin, y), line, fill="black", font=small)
        y += line_height(small)
    canvas.crop((0, 0, width, y + margin)).save(path)
    return path


def mean_difference(before: Path, after: Path) -> float:
    """Mean absolute difference of two images per pixel and channel, on the 0-255 scale."""
    from PIL import Image

    from .toy.measure import distance

    return distance(Image.open(before), Image.open(after))


def before_and_after(samples: dict[int, list[Path]], last_step: int, count: int) -> tuple[list[Path], list[Path]]:
    """The `count` previews of step 0 (before training) and those of the last step (the end-of-run previews). A run
    that made no such pair has nothing to compare: said, never papered over with one preview shown twice."""
    before, after = samples.get(0, []), samples.get(last_step, [])
    if len(before) != count or len(after) != count or last_step == 0:
        made = ", ".join(f"step {step}: {len(paths)}" for step, paths in sorted(samples.items())) or "none"
        raise RuntimeError(f"demo: expected {count} previews at step 0 and at the last step {last_step}; made: {made}")
    return before, after


def plan(steps: int) -> str:
    """The arithmetic from the dataset to the step count, in words (one bucket: every demo image is the same size)."""
    images = len(CONCEPT_COLOURS) * len(CONCEPT_BACKGROUNDS)
    per_epoch = images * NUM_REPEATS
    batches = math.ceil(per_epoch / BATCH_SIZE)
    return (f"{images} images x {NUM_REPEATS} repeats = {per_epoch} per epoch, batch {BATCH_SIZE} -> {batches} steps "
            f"per epoch, {steps} steps = {steps / batches:g} epochs")


def demo_config(out: Path, files: dict[str, Path], steps: int, learning_rate: float = LEARNING_RATE):
    """The run's TrainConfig; writes its dataset TOML and prompt file into `out`. Every path is absolute, so the TOML
    (whose relative image_dir would resolve against the working folder, as in sd-scripts) works from any folder."""
    from .config import TrainConfig
    from .flow import FlowConfig
    from .lora import LoRAConfig
    from .toy.models import T5_MAX_LENGTH

    out = out.resolve()
    toml = out / "dataset.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\nflip_aug = false\n\n[[datasets]]\n'
                    f'resolution = {RESOLUTION}\nbatch_size = {BATCH_SIZE}\n\n  [[datasets.subsets]]\n'
                    f'  image_dir = {json.dumps((out / "dataset").as_posix())}\n'
                    f'  num_repeats = {NUM_REPEATS}\n', encoding="utf-8")
    prompts = out / "prompts.txt"
    flags = f"--w {RESOLUTION} --h {RESOLUTION} --d {SAMPLE_SEED} --s {SAMPLE_STEPS} --g 1.0"
    prompts.write_text(f"{PROMPT} {flags}\n{OTHER_PROMPT} {flags}\n", encoding="utf-8")
    return TrainConfig.from_flags(
        pretrained_model_name_or_path=str(files["flux"]), clip_l=str(files["clip_l"]), t5xxl=str(files["t5xxl"]),
        ae=str(files["ae"]), clip_l_tokenizer=str(files["clip_l_tokenizer"]),
        t5xxl_tokenizer=str(files["t5xxl_tokenizer"]), t5xxl_max_token_length=T5_MAX_LENGTH, device="cpu",
        dataset_config=str(toml), network=LoRAConfig(network_dim=RANK, network_alpha=RANK,
                           network_train_unet_only=True),
        flow=FlowConfig(guidance_scale=1.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
        learning_rate=learning_rate, lr_scheduler="cosine", lr_warmup_steps=5, max_train_steps=steps, seed=42,
        cache_latents=True, cache_text_encoder_outputs=True, output_dir=str(out), output_name="demo_lora",
        save_precision="bf16", sample_prompts=str(prompts), sample_at_first=True, sample_at_end=True)


def looks_like(picture: Path) -> str:
    """The procedural picture a preview looks most like: the nearest one's colours, the best-fitting outline."""
    from PIL import Image

    from .toy.measure import nearest_caption

    colour, shape, background = nearest_caption(Image.open(picture))
    return f"a {colour} {shape} on {background}"


def shape_verdict(before: Path, after: Path) -> tuple[str, str, bool]:
    """What the trained prompt's previews look like before and after, and whether the after one is its caption: the
    star in the prompt's colours."""
    from .toy.shapes import NEW_SHAPE

    target = f"a {PROMPT_COLOUR} {NEW_SHAPE} on {PROMPT_BACKGROUND}"
    drawn_before, drawn_after = looks_like(before), looks_like(after)
    return drawn_before, drawn_after, drawn_after == target


def other_verdict(before: Path, after: Path) -> tuple[str, bool]:
    """What the unrelated prompt's after preview looks like, and whether it looks as its before preview does."""
    drawn_after = looks_like(after)
    return drawn_after, drawn_after == looks_like(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="folder for the toy models and results")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    from .console import ConsoleReporter
    from .events import Finished, Samples
    from .loop import train
    from .toy.models import write_toy_model_set

    start = time.perf_counter()
    out = Path(args.output).resolve()
    files = write_toy_model_set(out / "models")
    write_concept_dataset(out / "dataset")
    images = len(CONCEPT_COLOURS) * len(CONCEPT_BACKGROUNDS)
    print(f"demo: a toy FLUX.1 pretrained on captioned coloured circles, squares and triangles in {out / 'models'} "
          f"(random-weight text encoders, generated character-level tokenizers); {images} pictures of a shape it "
          f'never saw, a five-pointed star, captioned as "{CONCEPT}", in {out / "dataset"}')
    print(f"demo: training a rank-{RANK} LoRA on the CPU: {plan(args.steps)}")

    class Collecting(ConsoleReporter):
        def __init__(self) -> None:
            super().__init__()
            self.samples: dict[int, list[Path]] = {}
            self.finished: Finished | None = None

        def emit(self, event) -> None:
            super().emit(event)
            if isinstance(event, Samples):
                self.samples.setdefault(event.step, []).extend(Path(p) for p in event.paths)
            if isinstance(event, Finished):
                self.finished = event

    reporter = Collecting()
    train(demo_config(out, files, args.steps), reporter)
    finished = reporter.finished
    losses = list(finished.losses)
    n, first, last = loss_summary(losses)
    (before, other_before), (after, other_after) = before_and_after(reporter.samples, finished.steps, 2)
    fell = last < first
    curve = loss_curve(losses, out / "loss_curve.png")
    drawn_before, drawn_after, learned = shape_verdict(before, after)
    changed, other_changed = mean_difference(before, after), mean_difference(other_before, other_after)
    other_nearest, other_kept = other_verdict(other_before, other_after)
    note = (f'The toy model never saw a star, and "{CONCEPT}" meant nothing to it: before training its picture looks '
            f"most like {drawn_before}. After {finished.steps} steps with the LoRA it draws "
            + ("the red star on white of the training pictures" if learned else f"{drawn_after}, not yet the star")
            + f" ({changed:.1f}/255 per pixel changed). The unrelated prompt changed by {other_changed:.1f}/255 and "
            + ("looks as before" if other_kept else "now looks different")
            + f": {other_nearest}. (Each preview is judged against the procedural pictures: the nearest one's colours "
            "and the best-fitting outline.)")
    previews = comparison([(PROMPT, before, after), (OTHER_PROMPT, other_before, other_after)],
                          out / "before_after.png", before_step=0, after_step=finished.steps,
                          settings=f"{RESOLUTION}x{RESOLUTION} pixels, seed {SAMPLE_SEED}, {SAMPLE_STEPS} sampling "
                                   f"steps, shown {SCALE}x enlarged", note=note)
    rows = [
        (finished.lora.name, f"the trained LoRA (rank {RANK}, bf16, kohya format); it fits the toy models only"),
        (curve.name, f"the loss at each step (grey) and its running mean over {MEAN_WINDOW} steps (blue)"),
        (previews.name, f'"{PROMPT}" and "{OTHER_PROMPT}" at step 0 (before) and step {finished.steps} (after)'),
        ("sample/", "the same previews as the trainer wrote them, at their real size"),
        ("demo_lora_metrics.jsonl", "step, epoch, loss and learning rate of every step, one JSON line each"),
        ("dataset.toml", "the dataset config; its paths are absolute, so it works from any folder"),
        ("dataset/", f"the {images} generated training pictures with their captions (.txt)"),
        ("models/", "the toy models (made by python -m trainer.toy.pretrain) and their text encoders"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print("what happened:")
    print(f"  data:      {plan(len(losses))}")
    judged = "falling" if fell else "not falling"
    print(f"  loss:      {first:.3f} (mean of steps 1-{n}) -> {last:.3f} (mean of steps {len(losses) - n + 1}-"
          f"{len(losses)}): {judged}")
    print(f'  previews:  "{PROMPT}": {drawn_before} before, {drawn_after} after ({changed:.1f}/255 per pixel '
          "changed): " + ("the LoRA taught the new shape." if learned else "the LoRA has not taught the new shape."))
    print(f'             "{OTHER_PROMPT}": changed by {other_changed:.1f}/255 per pixel, {other_nearest} after: '
          + ("the LoRA left it alone." if other_kept else "the LoRA changed what it draws."))
    print("             (each preview judged against the procedural pictures: the nearest one's colours and the "
          "best-fitting outline)")
    print(f"files, in {out}{os.sep}")
    for name, what in rows:
        print(f"  {name:<{width}}  {what}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
