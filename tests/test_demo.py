"""The embedded default trains, writes what it promises and says where; its summary names its numbers, its pictures
are labelled, and its dataset TOML works from any folder. Above all its LoRA teaches: sampled by the trainer's own
sampler, the trained prompt moves from a shape the toy model knows onto the star of the training pictures, while an
unrelated prompt stays as the base model draws it."""

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image, ImageFont

import trainer.demo as demo
from trainer.cli import main as cli_main
from trainer.lora.files import apply_lora
from trainer.toy import measure, shapes
from trainer.toy.painter import ToyPainter

STEPS = demo.DEFAULT_STEPS
SEEDS = (11, 12, 13, 14)  # not the demo's preview seed: the LoRA must teach beyond the one picture it shows


def previews(folder: Path, index: str) -> tuple[Path, Path]:
    """The step-0 and the last-step preview of prompt `index` ("00", "01"), as the trainer named them:
    demo_lora_<step>_<index>_<stamp>_<seed>.png."""
    found = sorted((folder / "sample").glob(f"demo_lora_*_{index}_*.png"))
    steps = sorted(int(p.name.split("_")[2]) for p in found)
    assert steps == [0, STEPS]
    return tuple(next(p for p in found if int(p.name.split("_")[2]) == s) for s in steps)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo run as a newcomer runs it: a relative --output from some working folder."""
    base = tmp_path_factory.mktemp("demo")
    (base / "here").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base / "here")
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = demo.main(["--output", "out"])
    return base, code, buffer.getvalue()


@pytest.fixture(scope="module")
def painter(tmp_path_factory):
    return ToyPainter(tmp_path_factory.mktemp("painter"))


def test_demo_trains_and_writes_lora_curve_and_previews(demo_run):
    base, code, out = demo_run
    folder = base / "here" / "out"
    assert code == 0
    assert "generated character-level tokenizers" in out and "never saw, a five-pointed star" in out
    assert f"files, in {folder}" in out
    for name in ("demo_lora.safetensors", "loss_curve.png", "before_after.png", "dataset.toml"):
        assert (folder / name).is_file() and re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
    n = STEPS // 5
    match = re.search(rf"loss: +([\d.]+) \(mean of steps 1-{n}\) -> ([\d.]+) \(mean of steps {STEPS - n + 1}-"
                      rf"{STEPS}\): falling", out)
    assert match and float(match.group(2)) < float(match.group(1))
    assert "random weights" not in out and "noise" not in out


def test_demo_summary_spells_out_its_numbers_and_they_match_the_trainer(demo_run):
    _, _, out = demo_run
    said = f"8 images x 2 repeats = 16 per epoch, batch 2 -> 8 steps per epoch, {STEPS} steps = {STEPS / 8:g} epochs"
    assert out.count(said) == 2  # announced before training and repeated in the summary
    assert re.search(rf"training \d+ LoRA layers for {STEPS} steps \({-(-STEPS // 8)} epochs of 8\), 8 batches "
                     "per epoch", out)  # the trainer agrees
    assert demo.plan(45).endswith("45 steps = 5.625 epochs")


def test_demo_pictures_are_labelled(demo_run):
    base, _, _ = demo_run
    folder = base / "here" / "out"
    pictures = Image.open(folder / "before_after.png").convert("L")
    panel = demo.RESOLUTION * demo.SCALE
    assert pictures.width == 2 * panel + 16 + 2 * 14 and pictures.height > 2 * panel + 150  # two rows and labels
    assert pictures.crop((0, 30, pictures.width, 70)).getextrema()[0] < 80  # dark labels above the previews
    curve = Image.open(folder / "loss_curve.png").convert("L")
    assert curve.size == (720, 420)
    assert curve.crop((0, 100, 40, 320)).getextrema()[0] < 80  # the rotated 'loss' label left of the axis
    assert curve.crop((300, 385, 420, 420)).getextrema()[0] < 80  # 'step' under the axis


def test_demo_dataset_toml_works_from_any_folder(demo_run, tmp_path, monkeypatch, capsys):
    base, _, _ = demo_run
    folder = base / "here" / "out"
    toml = (folder / "dataset.toml").read_text(encoding="utf-8")
    image_dir = re.search(r'image_dir = "(.*)"', toml).group(1)
    assert Path(image_dir).is_absolute() and Path(image_dir) == folder / "dataset"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # train from another working folder with the demo's TOML as written
    models = folder / "models"
    tokenizers = models / "tokenizers"
    assert cli_main(["--pretrained_model_name_or_path", str(models / "flux.safetensors"),
                     "--clip_l", str(models / "clip_l.safetensors"), "--t5xxl", str(models / "t5xxl_fp16.safetensors"),
                     "--ae", str(models / "ae.safetensors"), "--clip_l_tokenizer", str(tokenizers / "clip_l"),
                     "--t5xxl_tokenizer", str(tokenizers / "t5xxl"), "--t5xxl_max_token_length", "16",
                     "--device", "cpu", "--dataset_config", os.path.relpath(folder / "dataset.toml", elsewhere),
                     "--output_dir", "again", "--output_name", "again", "--network_dim", "4",
                     "--network_train_unet_only", "--max_train_steps", "2", "--cache_latents"]) == 0
    assert "16 images" in capsys.readouterr().out
    assert (elsewhere / "again" / "again.safetensors").is_file()


def test_pictures_fall_back_to_the_bitmap_font(tmp_path, monkeypatch):
    """Pillow 10.0 (no size parameter) or a Pillow without FreeType: the small bitmap font, still laid out."""
    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("this Pillow has no separate bitmap default font")
    bitmap = ImageFont.load_default_imagefont

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    assert isinstance(demo.font(15), ImageFont.ImageFont)
    noise = tmp_path / "noise.png"
    Image.effect_noise((32, 32), 60).convert("RGB").save(noise)
    demo.comparison([(demo.PROMPT, noise, noise), (demo.OTHER_PROMPT, noise, noise)], tmp_path / "pair.png",
                    before_step=0, after_step=80, settings="32x32",
                    note="a note that is long enough to be wrapped onto a second line " * 3)
    demo.loss_curve([3.0 - 0.02 * i for i in range(80)], tmp_path / "curve.png")
    assert Image.open(tmp_path / "pair.png").height > 2 * 32 * demo.SCALE + 60


def test_demo_shows_each_prompts_preview_before_training_beside_the_one_after(demo_run):
    """before_after.png holds, for each prompt, step 0's preview on the left and the end-of-run one on the right
    (the demo's config asks for both; sd-scripts' cadence alone makes none at the end)."""
    base, _, out = demo_run
    folder = base / "here" / "out"
    pair = Image.open(folder / "before_after.png").convert("RGB")
    panel = demo.RESOLUTION * demo.SCALE
    tops = []
    for index in ("00", "01"):
        first, last = previews(folder, index)
        enlarged = [Image.open(p).convert("RGB").resize((panel, panel), Image.Resampling.NEAREST).tobytes()
                    for p in (first, last)]
        rows = [y for y in range(pair.height - panel)
                if pair.crop((14, y, 14 + panel, y + panel)).tobytes() == enlarged[0]]
        assert len(rows) == 1, index  # the left panel is step 0's preview ...
        x = 14 + panel + 16
        assert pair.crop((x, rows[0], x + panel, rows[0] + panel)).tobytes() == enlarged[1], index  # ... right: last
        tops.append(rows[0])
    assert tops[0] < tops[1]  # the trained prompt first
    assert re.search(rf'^  before_after\.png +"{demo.PROMPT}" and "{demo.OTHER_PROMPT}" at step 0 \(before\) and '
                     rf"step {STEPS} \(after\)$", out, re.M)


def test_demo_summary_says_what_the_previews_show(demo_run):
    """The printed verdicts are the measured ones: what each preview looks like against the procedural pictures (the
    nearest one's colours, the best-fitting outline)."""
    base, _, out = demo_run
    folder = base / "here" / "out"
    (before, after), (other_before, other_after) = previews(folder, "00"), previews(folder, "01")
    drawn = [demo.looks_like(p) for p in (before, after)]
    assert drawn[1] == "a red star on white" != drawn[0]
    assert (f'"{demo.PROMPT}": {drawn[0]} before, a red star on white after '
            f"({demo.mean_difference(before, after):.1f}/255 per pixel changed): the LoRA taught the new shape.") in out
    assert demo.looks_like(other_before) == demo.looks_like(other_after) == "a blue square on gray"
    assert (f'"{demo.OTHER_PROMPT}": changed by {demo.mean_difference(other_before, other_after):.1f}/255 per pixel, '
            "a blue square on gray after: the LoRA left it alone.") in out


def test_the_lora_teaches_the_trained_prompt_and_leaves_an_unrelated_one_alone(demo_run, painter):
    """The demo's LoRA applied to the committed base model, sampled by the trainer's own sampler at seeds the demo
    never previewed. The trained prompt: without the LoRA a circle, square or triangle outline fits better than a
    star's (the base model never saw one); with it the star's fits best, in every seed, and the pictures come
    nearer to the training pictures. The unrelated prompt: the same colours, and changed far less."""
    base, _, _ = demo_run
    lora = base / "here" / "out" / "demo_lora.safetensors"
    colour, background = demo.PROMPT_COLOUR, demo.PROMPT_BACKGROUND
    pictures = {}
    for multiplier in (0.0, 1.0):  # 0: the base model (the same LoRA again only changes its strength)
        apply_lora(painter.flux, lora, multiplier)
        pictures[multiplier] = {(prompt, seed): painter.draw(prompt, seed)
                                for prompt in (demo.PROMPT, demo.OTHER_PROMPT) for seed in SEEDS}
    before = [pictures[0.0][demo.PROMPT, s] for s in SEEDS]
    after = [pictures[1.0][demo.PROMPT, s] for s in SEEDS]
    assert all(measure.star_lead(p, colour, background) < 0 for p in before)  # a known shape's outline fits better
    assert all(measure.star_lead(p, colour, background) > 0 for p in after)  # the star's, in every seed
    assert all(measure.nearest_colours(p) == (colour, background) for p in after)
    to_training = [sum(measure.nearest_distance(p, colour, shapes.NEW_SHAPE, background) for p in ps)
                   for ps in (before, after)]
    assert to_training[1] < to_training[0] / 2  # per pixel, at least twice as near to the training pictures
    trained_change = sum(measure.distance(a, b) for a, b in zip(before, after))
    other = [[pictures[m][demo.OTHER_PROMPT, s] for s in SEEDS] for m in (0.0, 1.0)]
    other_change = sum(measure.distance(a, b) for a, b in zip(*other))
    assert other_change < trained_change / 4
    assert all(measure.nearest_colours(p) == (demo.OTHER[0], demo.OTHER[2]) for p in other[0] + other[1])


def test_demo_refuses_to_compare_a_preview_with_itself():
    samples = {0: [Path("a.png"), Path("b.png")]}
    with pytest.raises(RuntimeError, match="expected 2 previews at step 0 and at the last step 40; made: step 0: 2"):
        demo.before_and_after(samples, 40, 2)
    with pytest.raises(RuntimeError, match="expected 2 previews at step 0 and at the last step 0"):
        demo.before_and_after(samples, 0, 2)
    later = {0: [Path("a.png"), Path("b.png")], 20: [Path("c.png"), Path("d.png")], 40: [Path("e.png"), Path("f.png")]}
    assert demo.before_and_after(later, 40, 2) == ([Path("a.png"), Path("b.png")], [Path("e.png"), Path("f.png")])


def test_the_demo_concept_is_a_shape_the_toy_never_saw():
    assert shapes.NEW_SHAPE not in shapes.KNOWN_SHAPES and demo.OTHER[1] in shapes.KNOWN_SHAPES
    assert demo.OTHER[2] not in demo.CONCEPT_BACKGROUNDS  # the unrelated prompt shares nothing but its colour
