"""Datasets built in the graph (nodes/image_dataset.py + translate.image_set_config), on the CPU without ComfyUI:
IMAGE/MASK tensors and caption texts -> PNG + caption files in a folder named by their content -> the core's
DatasetConfig and pre-flight report."""

import json
import os

import numpy as np
import pytest
import torch
from packimport import pack
from PIL import Image

image_dataset = pack("nodes.image_dataset")
translate = pack("nodes.translate")
errors = pack("trainer.errors")


def batch(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE: [B, H, W, 3] floats in 0..1."""
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed))


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return np.rint(image.numpy() * 255.0).astype(np.uint8)


def written(images, captions=None, masks=None, root=None, **kw):
    pictures = image_dataset.image_set(images, captions, masks, **kw)
    return pictures, image_dataset.write_image_set(pictures, root)


def files_of(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------ images -> files

def test_a_batch_and_a_list_of_mixed_sizes_become_pngs_in_order_with_their_captions(tmp_path):
    first, second = batch(2, 64, 96, seed=1), batch(1, 80, 48, seed=2)
    pictures, out = written([first, second[0]], ["a red cat\nthe blue dog\na green bird\n"], root=tmp_path)
    assert out.folder.parent == tmp_path and out.folder.name == out.fingerprint[:24] and not out.reused
    assert sorted(p.name for p in out.folder.iterdir() if not p.name.startswith(".")) == \
        ["0001.png", "0001.txt", "0002.png", "0002.txt", "0003.png", "0003.txt"]
    for name, expected in (("0001", first[0]), ("0002", first[1]), ("0003", second[0])):
        with Image.open(out.folder / f"{name}.png") as image:
            assert image.mode == "RGB" and image.size == (expected.shape[1], expected.shape[0])
            assert np.array_equal(np.asarray(image), as_uint8(expected))
    assert [(out.folder / f"000{i}.txt").read_text(encoding="utf-8") for i in (1, 2, 3)] == \
        ["a red cat", "the blue dog", "a green bird"]
    assert image_dataset.summary_lines(pictures, out)[:3] == [
        "images from the graph: 3 (2 x 96x64, 1 x 48x80)", "  captions: 3 given, 0 missing (class tokens)",
        "  masks: none"]


def test_grey_and_rgba_images_are_stored_as_rgb(tmp_path):
    grey, rgba = torch.rand(1, 32, 32, 1), torch.rand(1, 32, 32, 4)
    _, out = written([grey, rgba], root=tmp_path)
    with Image.open(out.folder / "0001.png") as a, Image.open(out.folder / "0002.png") as b:
        assert a.mode == b.mode == "RGB"
        assert np.array_equal(np.asarray(a)[..., 0], as_uint8(grey[0])[..., 0])
        assert np.array_equal(np.asarray(b), as_uint8(rgba[0][..., :3]))


def test_masks_become_the_png_alpha_and_invert_mask_flips_them(tmp_path):
    images = batch(2, 40, 24)
    masks = torch.zeros(2, 40, 24)
    masks[0, :20] = 1.0
    masks[1, :, :12] = 0.5
    pictures, out = written(images, masks=masks, root=tmp_path / "a")
    with Image.open(out.folder / "0001.png") as image:
        assert image.mode == "RGBA"
        pixels = np.asarray(image)
    assert np.array_equal(pixels[..., :3], as_uint8(images[0])) and np.array_equal(pixels[..., 3], as_uint8(masks[0]))
    assert "masks: alpha masks" in image_dataset.summary_lines(pictures, out)[2]
    # the core reads that alpha back as the loss weight
    from flux_lora_trainer_pack.trainer.data.images import load_rgb

    assert np.array_equal(load_rgb(out.folder / "0002.png", with_alpha=True)[..., 3], as_uint8(masks[1]))
    _, inverted = written(images, masks=[masks[0], masks[1]], root=tmp_path / "b", invert_mask=True)
    with Image.open(inverted.folder / "0001.png") as image:
        assert np.array_equal(np.asarray(image)[..., 3], 255 - as_uint8(masks[0]))


# ------------------------------------------------------------------------------------------ written once, by content

def test_the_same_content_is_written_once_and_reused(tmp_path):
    images = batch(3, 32, 32)
    _, first = written(images, ["a\nb\nc"], root=tmp_path)
    before = files_of(first.folder)
    _, again = written(images.clone(), ["a", "b", "c"], root=tmp_path)  # same content, other caption form
    assert again.reused and again.folder == first.folder and files_of(first.folder) == before
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]


@pytest.mark.parametrize("change", ["pixel", "caption", "mask", "order", "no mask"])
def test_a_changed_pixel_caption_mask_or_order_gives_a_new_folder(tmp_path, change):
    images, masks, captions = batch(2, 16, 16), torch.ones(2, 16, 16), ["one", "two"]
    _, base = written(images, captions, masks, root=tmp_path)
    if change == "pixel":
        images = images.clone()
        images[1, 3, 4, 2] = 1.0 - images[1, 3, 4, 2]
    elif change == "caption":
        captions = ["one", "tw0"]  # same length: the text itself counts
    elif change == "mask":
        masks = masks.clone()
        masks[0, 0, 0] = 0.0
    elif change == "order":
        images, captions = images.flip(0), captions[::-1]
    else:
        masks = None
    _, other = written(images, captions, masks, root=tmp_path)
    assert not other.reused and other.fingerprint != base.fingerprint and other.folder != base.folder
    assert (base.folder / image_dataset.MANIFEST).is_file()  # the earlier set is left as it was


def test_a_write_that_fails_half_way_leaves_no_complete_folder_and_the_next_run_completes_it(tmp_path, monkeypatch):
    images = batch(3, 16, 16)
    real_save = Image.Image.save
    calls = []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(errors.SaveError, match="0002.png.*No space left on device"):
        written(images, root=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert sorted(os.listdir(folder)) == ["0001.png"]  # no manifest, no temporary, no half-written 0002.png
    monkeypatch.setattr(Image.Image, "save", real_save)
    _, out = written(images, root=tmp_path)
    assert out.folder == folder and not out.reused
    assert sorted(os.listdir(folder)) == [image_dataset.MANIFEST, "0001.png", "0002.png", "0003.png"]
    assert json.loads((folder / image_dataset.MANIFEST).read_text())["fingerprint"] == out.fingerprint


def test_a_folder_missing_a_file_is_written_again_not_reused(tmp_path):
    images = batch(2, 16, 16)
    _, first = written(images, ["x\ny"], root=tmp_path)
    (first.folder / "0002.txt").unlink()
    _, again = written(images, ["x\ny"], root=tmp_path)
    assert not again.reused and (first.folder / "0002.txt").read_text() == "y"


# ------------------------------------------------------------------------------------------ caption forms

@pytest.mark.parametrize("captions, expected", [
    (None, ["", "", ""]),
    ("", ["", "", ""]),
    (["", " \n"], ["", "", ""]),
    ("a\nb\nc", ["a", "b", "c"]),
    ("a\r\n\nc\n\n\n", ["a", "", "c"]),  # a blank line: that image has none; trailing blank lines are dropped
    (["a", "b", "c"], ["a", "b", "c"]),  # a list output, one per image
    (["a\n", "two\nlines", "  c "], ["a", "two lines", "c"]),  # the core reads one line: a caption's lines join
    ([["a", "b"], ["c"]], ["a", "b", "c"]),  # nested lists, as list outputs arrive
])
def test_caption_forms(captions, expected):
    assert image_dataset.caption_list(captions, 3) == expected


def test_one_text_for_one_image_is_its_caption_on_one_line():
    assert image_dataset.caption_list("a photo of sks\nin a garden\n", 1) == ["a photo of sks in a garden"]


@pytest.mark.parametrize("captions, message", [
    ("a\nb", "captions: 2 caption line\\(s\\) for 3 images"),
    ("only one", "1 caption line\\(s\\) for 3 images.*use class_tokens"),
    (["a", "b"], "captions: 2 captions for 3 images"),
    (["a", "b", "c", "d"], "captions: 4 captions for 3 images"),
    ([1, 2, 3], "captions: expected text \\(STRING\\), got int"),
])
def test_caption_counts_that_do_not_match_name_both_counts(captions, message):
    with pytest.raises(errors.DatasetConfigError, match=message):
        image_dataset.caption_list(captions, 3)


# ------------------------------------------------------------------------------------------ input errors

@pytest.mark.parametrize("images, masks, message", [
    ([], None, "images: no image arrived"),
    (torch.rand(2, 3, 16, 16, 3), None, "images: expected \\[batch, height, width, channels\\].*\\(2, 3, 16, 16, 3\\)"),
    (torch.rand(1, 16, 16, 2), None, "1, 3 or 4 channels.*\\(1, 16, 16, 2\\)"),
    ("picture.png", None, "images: expected ComfyUI IMAGES tensors, got str"),
    (torch.rand(3, 16, 16, 3), torch.ones(2, 16, 16), "masks: 2 masks for 3 images"),
    (torch.rand(1, 48, 32, 3), torch.ones(1, 64, 64), "mask 1 is 64x64 but image 1 is 32x48.*placeholder"),
    (torch.rand(1, 16, 16, 3), torch.ones(1, 1, 16, 16), "masks: expected \\[batch, height, width\\]"),
])
def test_bad_inputs_are_clear_errors(images, masks, message, tmp_path):
    with pytest.raises(errors.DatasetConfigError, match=message):
        written(images, masks=masks, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------------------ -> DatasetConfig

def test_the_folder_becomes_a_dataset_with_the_folder_nodes_options(tmp_path):
    _, out = written(batch(2, 64, 64), ["a\nb"], root=tmp_path)
    config = translate.image_set_config(out.folder, 64, 96, 'color_aug = true\ncaption_prefix = "photo, "',
                                        alpha_mask=False, batch_size=2, num_repeats=5, class_tokens=" sks ",
                                        is_reg=True, enable_bucket=True, min_bucket_reso=64,
                                        network_multiplier=0.5)
    (subset,) = config.subsets
    assert (config.resolution, config.batch_size, config.enable_bucket, config.network_multiplier) == \
        ((64, 96), 2, True, 0.5)
    assert (subset.image_dir, subset.caption_extension, subset.alpha_mask, subset.num_repeats, subset.class_tokens,
            subset.is_reg, subset.color_aug, subset.caption_prefix) == \
        (str(out.folder), ".txt", False, 5, "sks", True, True, "photo, ")
    assert translate.image_set_config(out.folder, 64, alpha_mask=True).subsets[0].alpha_mask is True


@pytest.mark.parametrize("extra", ["alpha_mask = true", 'caption_extension = ".caption"', 'image_dir = "x"',
                                   "resolution = 512"])
def test_extra_options_cannot_override_what_the_node_sets(tmp_path, extra):
    key = extra.split(" ")[0]
    with pytest.raises(errors.DatasetConfigError, match=f"extra_options: '{key}' is set by the"):
        translate.image_set_config(tmp_path, 64, extra_options=extra)


def test_the_cores_preflight_report_sees_the_written_images(tmp_path):
    images = [batch(2, 64, 64), batch(1, 64, 128, seed=3)]
    pictures, out = written(images, ["a red cat\n\na green bird"], root=tmp_path)
    config = translate.image_set_config(out.folder, 64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                                        bucket_reso_steps=16)
    from flux_lora_trainer_pack.trainer.preflight import preflight_report

    lines = translate.report_lines(preflight_report(translate.preview_config((config,))))
    text = "\n".join(lines)
    assert "3 images" in text and "2 of 3 images have a caption file" in text and "(e.g. 0002.png)" in text
    buckets = [ln.strip() for ln in lines if ln.strip().startswith("bucket ")]
    assert len(buckets) == 2 and "bucket 64x64: 2 images" in buckets, text  # the wide image has a bucket of its own
    assert image_dataset.summary_lines(pictures, out)[1] == "  captions: 2 given, 1 missing (class tokens)"


def test_the_image_set_root_is_in_our_cache_folder_not_input_or_temp(tmp_path):
    paths = pack("nodes.paths")
    root = paths.image_set_root(tmp_path / "output")
    assert root == tmp_path / "output" / "flux_lora_trainer" / "cache" / "image_sets"
