"""Each caption option, with a fixed seed."""

import json
import random
from collections import Counter

import pytest

from trainer.config import DatasetConfig, SubsetConfig
from trainer.data import FluxDataset
from trainer.data.captions import CaptionError, process_caption, read_caption

from datagen import rgb

CAPTION = "sks dog, sitting, grass, sunny day, photo"


def run(caption=CAPTION, seed=0, epoch=1, **options):
    return process_caption(caption, SubsetConfig(**options), random.Random(seed), epoch=epoch)


def tags(text):
    return [t.strip() for t in text.split(",")]


def test_plain_caption_is_unchanged():
    assert run() == CAPTION


def test_prefix_and_suffix():
    assert run(caption_prefix="masterpiece", caption_suffix="4k") == f"masterpiece {CAPTION} 4k"


def test_shuffle_keeps_the_first_keep_tokens():
    seen = set()
    for seed in range(30):
        out = tags(run(seed=seed, shuffle_caption=True, keep_tokens=1))
        assert out[0] == "sks dog" and Counter(out) == Counter(tags(CAPTION))
        seen.add(tuple(out))
    assert len(seen) > 5
    assert run(seed=3, shuffle_caption=True) == run(seed=3, shuffle_caption=True)  # reproducible


def test_keep_tokens_separator_with_fixed_suffix():
    caption = "sks dog, portrait ||| sitting, grass, sunny ||| photo, 4k"
    for seed in range(10):
        out = tags(run(caption, seed=seed, shuffle_caption=True, keep_tokens_separator="|||"))
        assert out[:2] == ["sks dog", "portrait"] and out[-2:] == ["photo", "4k"]
        assert sorted(out[2:-2]) == ["grass", "sitting", "sunny"]
    unshuffled = run(caption, keep_tokens_separator="|||")
    assert "|||" not in unshuffled and unshuffled == "sks dog, portrait, sitting, grass, sunny, photo, 4k"


def test_caption_dropout_rate():
    dropped = sum(run(seed=s, caption_dropout_rate=0.5) == "" for s in range(200))
    assert 70 < dropped < 130
    assert all(run(seed=s, caption_dropout_rate=1.0) == "" for s in range(5))


def test_caption_dropout_every_n_epochs():
    assert run(epoch=4, caption_dropout_every_n_epochs=2) == ""
    assert run(epoch=3, caption_dropout_every_n_epochs=2) == CAPTION


def test_tag_dropout_spares_kept_tokens():
    out = tags(run(caption_tag_dropout_rate=1.0, keep_tokens=2))
    assert out == ["sks dog", "sitting"]
    lengths = [len(tags(run(seed=s, caption_tag_dropout_rate=0.5))) for s in range(100)]
    assert 2 < sum(lengths) / len(lengths) < 3.2


def test_wildcards_and_escapes():
    outs = {run("a {red|blue} car, {{literal}}", seed=s, enable_wildcard=True) for s in range(30)}
    assert outs == {"a red car, {literal}", "a blue car, {literal}"}
    lines = {run("first line\nsecond line", seed=s, enable_wildcard=True) for s in range(30)}
    assert lines == {"first line", "second line"}
    assert run("first line\nsecond line") == "first line"


def test_secondary_separator():
    assert run("sks dog;;red collar, grass", secondary_separator=";;") == "sks dog,red collar, grass"


def test_token_warmup():
    subset = SubsetConfig(token_warmup_min=1, token_warmup_step=10)
    early = process_caption(CAPTION, subset, random.Random(0), step=0)
    late = process_caption(CAPTION, subset, random.Random(0), step=10)
    assert tags(early) == ["sks dog"] and late == CAPTION


def test_read_caption_first_line_and_errors(tmp_path):
    image = tmp_path / "img.png"
    image.touch()
    (tmp_path / "img.txt").write_text("first line\nsecond line\n")
    assert read_caption(image, ".txt") == "first line"
    assert read_caption(image, ".txt", wildcards=True) == "first line\nsecond line"
    assert read_caption(image, ".caption") is None
    (tmp_path / "img.bad").write_bytes(b"\xff\xfe\x00broken")
    with pytest.raises(CaptionError, match="img.bad: not UTF-8"):
        read_caption(image, ".bad")


def test_a_utf8_bom_is_not_part_of_the_caption(tmp_path):
    """Notepad and some taggers start files with a UTF-8 BOM; left in, CLIP and T5 see junk tokens."""
    image = tmp_path / "img.png"
    image.touch()
    (tmp_path / "img.txt").write_bytes("\ufeffsks dog, grass\r\nsecond\r\n".encode())
    assert read_caption(image, ".txt") == "sks dog, grass"
    assert read_caption(image, ".txt", wildcards=True) == "sks dog, grass\nsecond"
    (tmp_path / "img.caption").write_bytes(b"\xef\xbb\xbf")  # a BOM and nothing else: an empty caption
    assert read_caption(image, ".caption") == ""


def test_a_utf8_bom_in_a_metadata_file_is_accepted(tmp_path):
    rgb(tmp_path / "img" / "one.png", 64, 64, caption=None)
    (tmp_path / "meta.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"one": {"caption": "a photo"}}).encode())
    config = DatasetConfig(resolution=(64, 64), subsets=(SubsetConfig(metadata_file=str(tmp_path / "meta.json"),
                                                                      image_dir=str(tmp_path / "img")),))
    assert [i.caption for i in FluxDataset(config).items] == ["a photo"]


def test_utf16_captions_are_read_with_a_bom_and_refused_without(tmp_path):
    image = tmp_path / "img.png"
    (tmp_path / "img.bom").write_bytes("a red fox".encode("utf-16"))
    assert read_caption(image, ".bom") == "a red fox"
    (tmp_path / "img.nobom").write_bytes("a red fox".encode("utf-16-le"))  # would train as "a\0 \0r\0e\0d ..."
    with pytest.raises(CaptionError, match=r"img\.nobom: holds NUL characters.*UTF-16 text without a byte-order"):
        read_caption(image, ".nobom")


@pytest.mark.parametrize("extension", ["/etc/passwd", ".txt/../../secret", "\\\\server\\share.txt", ".."])
def test_a_caption_extension_holding_a_path_is_refused(tmp_path, extension):
    with pytest.raises(CaptionError, match="caption_extension .*not a path"):
        read_caption(tmp_path / "img.png", extension)
