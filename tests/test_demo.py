"""The embedded default trains, writes what it promises and says where, even with no real tokenizers at hand; its
summary names its numbers, its pictures are labelled, and its dataset TOML works from any folder."""

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image, ImageFont

import trainer.demo as demo
from trainer.cli import main as cli_main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo run as a newcomer runs it: a relative --output from some working folder."""
    base = tmp_path_factory.mktemp("demo")
    (base / "here").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "REPO_ROOT", base / "nowhere" / "repo")  # no ../shared, no ComfyUI around
        mp.delenv("FLUX_TRAINER_TOKENIZERS", raising=False)
        mp.chdir(base / "here")
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = demo.main(["--output", "out", "--steps", "40"])
    return base, code, buffer.getvalue()


def test_demo_trains_and_writes_lora_curve_and_previews(demo_run):
    base, code, out = demo_run
    folder = base / "here" / "out"
    assert code == 0
    assert "generated character-level tokenizers" in out
    assert f"files, in {folder}" in out
    for name in ("demo_lora.safetensors", "loss_curve.png", "before_after.png", "dataset.toml"):
        assert (folder / name).is_file() and re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
    match = re.search(r"loss: +([\d.]+) \(mean of steps 1-8\) -> ([\d.]+) \(mean of steps 33-40\): falling", out)
    assert match and float(match.group(2)) < float(match.group(1))
    assert "random weights" in out and "the evidence that training worked" in out


def test_demo_summary_spells_out_its_numbers_and_they_match_the_trainer(demo_run):
    _, _, out = demo_run
    said = "8 images x 2 repeats = 16 per epoch, batch 2 -> 8 steps per epoch, 40 steps = 5 epochs"
    assert out.count(said) == 2  # announced before training and repeated in the summary
    assert "training 26 LoRA layers for 40 steps (5 epochs of 8), 8 batches per epoch" in out  # the trainer agrees
    assert demo.plan(45).endswith("45 steps = 5.625 epochs")


def test_demo_pictures_are_labelled(demo_run):
    base, _, _ = demo_run
    folder = base / "here" / "out"
    pictures = Image.open(folder / "before_after.png").convert("L")
    panels = 64 * 4
    assert pictures.width == 2 * panels + 16 + 2 * 14 and pictures.height > panels + 120  # room for the labels
    title = pictures.crop((0, 0, pictures.width, 40))
    assert title.getextrema()[0] < 80  # dark text above the previews
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
    models, tokenizers = folder / "models", folder / "tokenizers"
    assert cli_main(["--pretrained_model_name_or_path", str(models / "flux.safetensors"),
                     "--clip_l", str(models / "clip_l.safetensors"), "--t5xxl", str(models / "t5xxl_fp16.safetensors"),
                     "--ae", str(models / "ae.safetensors"), "--clip_l_tokenizer", str(tokenizers / "clip_l"),
                     "--t5xxl_tokenizer", str(tokenizers / "t5xxl"), "--t5xxl_max_token_length", "32",
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
    Image.effect_noise((64, 64), 60).convert("RGB").save(noise)
    demo.side_by_side(noise, noise, tmp_path / "pair.png", before_step=0, after_step=80, prompt=demo.PROMPT,
                      settings="64x64", note="a note that is long enough to be wrapped onto a second line " * 3)
    demo.loss_curve([3.0 - 0.02 * i for i in range(80)], tmp_path / "curve.png")
    assert Image.open(tmp_path / "pair.png").height > 64 * 4 + 60


def test_demo_prefers_real_tokenizers(tokenizer_dirs, tmp_path):
    found, note = demo.find_tokenizers(str(Path(tokenizer_dirs["clip_l"]).parent), tmp_path)
    assert found["clip_l"] == tokenizer_dirs["clip_l"] and "real tokenizers" in note


def test_demo_compares_the_preview_before_training_with_the_one_after(demo_run):
    """The claim "before and after differ: the LoRA changes the output" is about two different previews: step 0's
    and the end-of-run one, which the demo's config asks for (sd-scripts' cadence alone makes none at the end)."""
    base, _, out = demo_run
    folder = base / "here" / "out"
    previews = sorted((folder / "sample").glob("*.png"))
    steps = sorted(int(p.name.split("_")[2]) for p in previews)  # demo_lora_<step>_<index>_<stamp>_<seed>.png
    assert steps == [0, 40]
    first, last = (next(p for p in previews if int(p.name.split("_")[2]) == s) for s in steps)
    difference = demo.mean_difference(first, last)
    assert difference > 0
    assert f"Step 0 (before) and step 40 (after) differ by {difference:.1f}/255 per pixel on average: the LoRA " \
           "changes the output." in out
    assert re.search(r'^  before_after\.png +".*" sampled at step 0 \(before\) and step 40 \(after\)$', out, re.M)
    pair = Image.open(folder / "before_after.png").convert("RGB")
    panel = 64 * 4
    enlarged = [Image.open(p).convert("RGB").resize((panel, panel), Image.Resampling.NEAREST).tobytes()
                for p in (first, last)]
    rows = [y for y in range(pair.height - panel) if pair.crop((14, y, 14 + panel, y + panel)).tobytes() == enlarged[0]]
    assert len(rows) == 1  # the left panel is step 0's preview ...
    x = 14 + panel + 16
    assert pair.crop((x, rows[0], x + panel, rows[0] + panel)).tobytes() == enlarged[1]  # ... the right one step 40's


def test_demo_refuses_to_compare_a_preview_with_itself():
    samples = [(0, Path("a.png"))]
    with pytest.raises(RuntimeError, match="expected previews at step 0 and at the last step 40; made: step 0"):
        demo.before_and_after(samples, 40)
    assert demo.before_and_after([(0, Path("a.png")), (20, Path("b.png")), (40, Path("c.png"))], 40) == (
        (0, Path("a.png")), (40, Path("c.png")))
