"""The embedded default trains, writes what it promises and says where, even with no real tokenizers at hand."""

import re
from pathlib import Path

from PIL import Image

import trainer.demo as demo


def test_demo_trains_and_writes_lora_curve_and_previews(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path / "nowhere" / "repo")  # no ../shared, no ComfyUI around
    monkeypatch.delenv("FLUX_TRAINER_TOKENIZERS", raising=False)
    assert demo.main(["--output", str(tmp_path / "out"), "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert "generated character-level tokenizers" in out
    for name in ("demo_lora.safetensors", "loss_curve.png", "before_after.png"):
        assert (tmp_path / "out" / name).is_file() and str(tmp_path / "out" / name) in out
    match = re.search(r"loss ([\d.]+) over the first \d+ steps -> ([\d.]+) over the last", out)
    assert match and float(match.group(2)) < float(match.group(1))
    assert Image.open(tmp_path / "out" / "before_after.png").size == (64 * 4 * 2 + 8, 64 * 4)


def test_demo_prefers_real_tokenizers(tokenizer_dirs, tmp_path):
    found, note = demo.find_tokenizers(str(Path(tokenizer_dirs["clip_l"]).parent), tmp_path)
    assert found["clip_l"] == tokenizer_dirs["clip_l"] and "real tokenizers" in note
