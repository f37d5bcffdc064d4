"""Generated folders of mixed formats and broken files: every usable image is read right, every broken one is
skipped with one summary, the folder is only read."""

import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from trainer.data import DatasetError, FluxDataset, single_folder_dataset
from trainer.data import images as images_module
from trainer.data.images import load_rgb, probe

from datagen import mixed_folder, rgb


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return root, mixed_folder(root)


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_broken_files_are_skipped_with_one_summary(folder, caplog):
    root, files = folder
    before = snapshot(root)
    with caplog.at_level(logging.WARNING):
        dataset = FluxDataset(single_folder_dataset(root, 64, caption_extension=".txt", enable_bucket=True,
                                                    min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=16))
    skipped = {p.name for p in dataset.skipped.problems}
    assert skipped == {"broken_empty.png", "broken_noise.jpg", "broken_truncated.jpg", "broken_text.png"}
    reasons = {p.name: why for p, why in dataset.skipped.problems.items()}
    assert "0 bytes" in reasons["broken_empty.png"] and "truncated" in reasons["broken_truncated.jpg"]
    summaries = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summaries) == 1 and "broken_noise.jpg" in summaries[0].getMessage()
    assert {i.path.name for i in dataset.items} == {p.name for k, p in files.items() if not k.startswith("broken")}
    assert snapshot(root) == before  # nothing written to the user's folder


def test_every_mode_loads_as_rgb(folder):
    _, files = folder
    for key in ("rgb_png", "jpeg", "webp", "bmp", "rgba", "palette", "grey", "sixteen", "cmyk", "rotated"):
        pixels = load_rgb(files[key])
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, key


def test_sixteen_bit_is_scaled_not_clipped(folder):
    pixels = load_rgb(folder[1]["sixteen"])
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert 120 <= pixels[0, 32, 0] <= 135  # mid-grey stays mid-grey


def test_alpha_channel_is_kept_when_asked(folder):
    pixels = load_rgb(folder[1]["rgba"], with_alpha=True)
    assert pixels.shape[2] == 4 and pixels[0, 0, 3] == 0 and pixels[0, -1, 3] == 255
    assert load_rgb(folder[1]["palette"], with_alpha=True).shape[2] == 4


def test_exif_rotation_is_applied_to_size_and_pixels(folder):
    path = folder[1]["rotated"]
    assert probe(path) == (64, 96)
    assert load_rgb(path).shape[:2] == (96, 64)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    rgb(tmp_path / "big.png", 200, 200)
    rgb(tmp_path / "ok.png", 64, 64)
    monkeypatch.setattr(images_module, "MAX_PIXELS", 100 * 100)
    dataset = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt"))
    assert "decompression-bomb guard" in dataset.skipped.problems[tmp_path / "big.png"]
    assert [i.path.name for i in dataset.items] == ["ok.png"]


def png_header(path, width, height):
    """A PNG of a few dozen bytes that claims width x height: signature, IHDR (8-bit RGB) with its CRC, IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_header_past_pillows_own_limit_is_skipped_not_fatal(tmp_path):
    """Pillow's default limit fires inside Image.open (before ours): still one skipped file, and Pillow's global
    limit (shared with ComfyUI) is left as it was."""
    default = Image.MAX_IMAGE_PIXELS
    assert default == int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's default: errors above twice this
    bomb = png_header(tmp_path / "bomb.png", 14000, 14000)
    assert bomb.stat().st_size < 100
    rgb(tmp_path / "ok.png", 64, 64)
    dataset = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt"))
    why = dataset.skipped.problems[bomb]
    assert "14000x14000" in why and f"{2 * default:,}" in why and "decompression-bomb guard" in why, why
    assert [i.path.name for i in dataset.items] == ["ok.png"]
    assert Image.MAX_IMAGE_PIXELS == default
    with pytest.raises(images_module.ImageProblem, match="14000x14000"):
        load_rgb(bomb)


def test_pillows_bomb_warning_and_a_host_without_pillows_limit(tmp_path, monkeypatch):
    """Between Pillow's warning and error limits an image is used (our own limit decides); a process that turns
    warnings into errors gets a skip, not a traceback; with Pillow's limit off (MAX_IMAGE_PIXELS = None) ours holds."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # Pillow warns above 4096 pixels, refuses above 8192
    rgb(tmp_path / "warned.png", 80, 80)  # 6400 pixels
    rgb(tmp_path / "ok.png", 64, 64)
    config = single_folder_dataset(tmp_path, 64, caption_extension=".txt")
    with pytest.warns(Image.DecompressionBombWarning):
        dataset = FluxDataset(config)
    assert sorted(i.path.name for i in dataset.items) == ["ok.png", "warned.png"] and not dataset.skipped.problems
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        dataset = FluxDataset(config)
    why = dataset.skipped.problems[tmp_path / "warned.png"]
    assert "80x80" in why and "4,096" in why, why
    assert [i.path.name for i in dataset.items] == ["ok.png"]

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    png_header(tmp_path / "huge.png", 17000, 17000)
    dataset = FluxDataset(config)
    why = dataset.skipped.problems[tmp_path / "huge.png"]
    assert "17000x17000" in why and f"{images_module.MAX_PIXELS:,}" in why, why
    assert sorted(i.path.name for i in dataset.items) == ["ok.png", "warned.png"]


def test_a_dataset_left_empty_is_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"no usable training images in .*\(1 file\(s\) could not be used\)"):
        FluxDataset(single_folder_dataset(tmp_path, 64))
    with pytest.raises(DatasetError, match="not a folder"):
        FluxDataset(single_folder_dataset(tmp_path / "missing", 64))


def test_missing_captions_use_class_tokens(folder):
    root, files = folder
    dataset = FluxDataset(single_folder_dataset(root, 64, caption_extension=".txt", class_tokens="sks style"))
    by_name = {i.path.name: i.caption for i in dataset.items}
    assert by_name["uncaptioned.png"] == "sks style" and by_name["rgb.png"] == "red, green, blue"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def odd_pngs(folder):
    """Files whose reading ends in other Pillow error classes than OSError (ValueError, SyntaxError)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 << 20), zip=True)  # 2 KB on disk, inflates past Pillow's text limit
    Image.new("RGB", (8, 8)).save(folder / "text_bomb.png", pnginfo=info)
    signature = b"\x89PNG\r\n\x1a\n"
    (folder / "short_header.png").write_bytes(signature + _png_chunk(b"IHDR", b"\0\0\0\x10"))
    rgb(folder / "bad_chunk.png", 16, 16, caption=None)
    good = (folder / "bad_chunk.png").read_bytes()
    at = good.index(b"IDAT")  # an IDAT length that stops mid-data: the next "chunk" is image bytes
    length = struct.unpack(">I", good[at - 4:at])[0]
    (folder / "bad_chunk.png").write_bytes(good[:at - 4] + struct.pack(">I", length - 23) + good[at:])
    return {"text_bomb.png": "Decompressed data too large", "short_header.png": "ValueError",
            "bad_chunk.png": "SyntaxError"}


def test_every_pillow_error_class_is_a_skipped_file(tmp_path):
    expected = odd_pngs(tmp_path)
    rgb(tmp_path / "ok.png", 64, 64)
    dataset = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt"))
    reasons = {p.name: why for p, why in dataset.skipped.problems.items()}
    assert set(reasons) == set(expected)
    for name, text in expected.items():
        assert text in reasons[name], reasons[name]
        with pytest.raises(images_module.ImageProblem):
            load_rgb(tmp_path / name)
    assert [i.path.name for i in dataset.items] == ["ok.png"]
