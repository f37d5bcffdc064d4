"""Masked loss from mask images, sd-scripts' way: a subset's `conditioning_data_dir` holds one mask per image, named
like it; its R channel (resized and cropped exactly like the image) weighs the loss; the dataset TOML names the folder
only with --masked_loss; a missing or wrongly sized mask is refused, naming the image."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DatasetConfig, SubsetConfig, datasets_from_dict
from trainer.data import DatasetGroup, FluxDataset, cache_latents
from trainer.errors import DatasetConfigError, DatasetError
from trainer.models import load_autoencoder

from datagen import gradient, rgb
from trainspace import cli_args, make_workspace


def write_mask(path: Path, red: np.ndarray, seed: int = 0) -> None:
    """A mask image whose G and B channels are noise: only R may count."""
    noise = np.random.default_rng(seed).integers(0, 256, size=(*red.shape, 2), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([red, noise]).astype(np.uint8), "RGB").save(path)


def masked_subset(images: Path, masks: Path, **options) -> DatasetConfig:
    return DatasetConfig(resolution=(64, 64), batch_size=1, subsets=(
        SubsetConfig(image_dir=str(images), conditioning_data_dir=str(masks), caption_extension=".txt", **options),))


def test_the_mask_is_the_r_channel_resized_and_cropped_like_the_image(tmp_path):
    # 160x128 at resolution 64 without buckets: halved (area) to 80x64, then 8 columns cut from each side
    rgb(tmp_path / "img" / "a.png", 160, 128, "a")
    red = np.repeat(np.repeat(np.random.default_rng(1).integers(0, 256, (64, 80)), 2, 0), 2, 1).astype(np.uint8)
    write_mask(tmp_path / "mask" / "a.png", red)
    dataset = FluxDataset(masked_subset(tmp_path / "img", tmp_path / "mask"))
    batch = dataset.batch(0)
    expected = red[::2, ::2][:, 8:72].astype(np.float64) / 255  # constant 2x2 blocks: their area average is exact
    assert batch.images.shape == (1, 3, 64, 64) and batch.alpha_masks.shape == (1, 64, 64)
    assert np.allclose(batch.alpha_masks[0].numpy(), expected, atol=1e-7)


def test_random_crop_and_flip_move_the_mask_with_the_image(tmp_path):
    # the image's own pixels are its mask's R channel: wherever the crop falls and whichever way it flips, they agree
    pixels = np.dstack([gradient(96, 64)[..., 0]] * 3)
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("a")
    write_mask(tmp_path / "mask" / "a.png", pixels[..., 0])
    dataset = FluxDataset(masked_subset(tmp_path / "img", tmp_path / "mask", random_crop=True, flip_aug=True))
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        batch = dataset.batch(0)
        image_red = (batch.images[0, 0] + 1) * 127.5 / 255
        assert torch.allclose(image_red, batch.alpha_masks[0], atol=1e-5)
        seen.add((batch.flipped[0], float(batch.alpha_masks[0, 0, 0])))
    assert len(seen) > 2  # crops and flips did vary


def test_a_missing_mask_is_refused_naming_the_image(tmp_path):
    for name in ("a", "b", "c"):
        rgb(tmp_path / "img" / f"{name}.png", 64, 64, name)
    write_mask(tmp_path / "mask" / "a.png", np.zeros((64, 64), np.uint8))
    write_mask(tmp_path / "mask" / "c.jpg", np.zeros((64, 64), np.uint8))  # any image extension pairs
    with pytest.raises(DatasetError, match=r"no mask image for 1 image\(s\) of .*img: b\.png .*b\.png"):
        FluxDataset(masked_subset(tmp_path / "img", tmp_path / "mask"))


def test_a_mask_of_another_size_or_a_missing_folder_is_refused(tmp_path):
    rgb(tmp_path / "img" / "a.png", 64, 64, "a")
    write_mask(tmp_path / "mask" / "a.png", np.zeros((32, 64), np.uint8))
    with pytest.raises(DatasetError, match=r"mask image .*a\.png is 64x32 but its image .*a\.png is 64x64"):
        FluxDataset(masked_subset(tmp_path / "img", tmp_path / "mask"))
    with pytest.raises(DatasetError, match=r"conditioning_data_dir .*nowhere: not a folder"):
        FluxDataset(masked_subset(tmp_path / "img", tmp_path / "nowhere"))


def test_the_toml_key_needs_masked_loss_and_excludes_alpha_mask():
    document = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": "img", "conditioning_data_dir": "m"}]}]}
    with pytest.raises(DatasetConfigError, match=r"subsets\]\] #1: 'conditioning_data_dir' .* only with --masked_loss"):
        datasets_from_dict(document)
    (config,) = datasets_from_dict(document, {"alpha_mask": True}, masked_loss=True)
    assert config.subsets[0].conditioning_data_dir == "m" and not config.subsets[0].alpha_mask  # the masks win
    document["datasets"][0]["subsets"][0]["alpha_mask"] = True
    with pytest.raises(DatasetConfigError, match="'conditioning_data_dir' and 'alpha_mask' both give the loss mask"):
        datasets_from_dict(document, masked_loss=True)
    with pytest.raises(DatasetConfigError, match="cannot be used with 'metadata_file'"):
        SubsetConfig(image_dir="img", metadata_file="m.json", conditioning_data_dir="m")


def test_cached_latents_stay_valid_and_the_mask_is_read_fresh(tmp_path, tiny_files):
    rgb(tmp_path / "img" / "a.png", 64, 64, "a")
    write_mask(tmp_path / "mask" / "a.png", np.full((64, 64), 255, np.uint8))
    dataset = FluxDataset(masked_subset(tmp_path / "img", tmp_path / "mask"))
    ae = load_autoencoder(tiny_files["ae"], dtype=torch.float32)
    cache_latents(DatasetGroup([dataset]), ae, to_disk=True)
    assert not any(k.startswith("alpha_mask") for k in np.load(tmp_path / "img" / "a_0064x0064_flux.npz"))
    red = np.zeros((64, 64), np.uint8)
    red[:, :16] = 204
    write_mask(tmp_path / "mask" / "a.png", red)  # an edited mask: the latents are still those of the image
    assert cache_latents(DatasetGroup([dataset]), ae, to_disk=True)["reused"] == 1
    batch = dataset.batch(0)
    assert batch.latents is not None and np.allclose(batch.alpha_masks[0].numpy(), red / 255, atol=1e-7)


def test_unmasked_samples_of_a_batch_weigh_one(tmp_path):
    rgb(tmp_path / "img" / "a.png", 64, 64, "a")
    rgb(tmp_path / "plain" / "b.png", 64, 64, "b")
    write_mask(tmp_path / "mask" / "a.png", np.zeros((64, 64), np.uint8))
    config = DatasetConfig(resolution=(64, 64), batch_size=2, subsets=(
        SubsetConfig(image_dir=str(tmp_path / "img"), conditioning_data_dir=str(tmp_path / "mask"),
                     caption_extension=".txt"),
        SubsetConfig(image_dir=str(tmp_path / "plain"), caption_extension=".txt")))
    batch = FluxDataset(config).batch(0)
    masks = {p.name: m for p, m in zip(batch.paths, batch.alpha_masks)}
    assert masks["a.png"].max() == 0 and masks["b.png"].min() == 1


def latent_mask(red: np.ndarray) -> np.ndarray:
    """The loss weight at latent resolution, computed apart from the trainer: R / 255 averaged over 8x8 pixels."""
    return (red.astype(np.float64) / 255).reshape(8, 8, 8, 8).mean(axis=(1, 3))


def test_a_kohya_mask_dataset_trains_from_the_command_line_with_its_r_channel_as_loss_weights(
        tmp_path, tokenizer_dirs, monkeypatch):
    from trainer import flow
    from trainer.cli import main

    ws = make_workspace(tmp_path / "ws", batch_size=1)
    expected = {}
    for i, image in enumerate(sorted((tmp_path / "ws" / "dataset").glob("*.png"))):
        red = np.random.default_rng(10 + i).integers(0, 256, (64, 64)).astype(np.uint8)
        write_mask(tmp_path / "masks" / image.name, red, seed=i)
        expected[image.name] = latent_mask(red)
    ws["toml"].write_text(ws["toml"].read_text() + f'conditioning_data_dir = "{(tmp_path / "masks").as_posix()}"\n')
    seen, original = [], flow.batch_loss

    def batch_loss(prediction, target, cfg, sigmas, weighting=None, mask=None, sample_weights=None):
        seen.append(None if mask is None else mask.detach().clone())
        return original(prediction, target, cfg, sigmas, weighting, mask, sample_weights)

    monkeypatch.setattr(flow, "batch_loss", batch_loss)
    out = tmp_path / "out"
    assert main(cli_args(ws, tokenizer_dirs, out) + ["--masked_loss", "--max_train_steps", "4", "--cache_latents",
                                                     "--cache_text_encoder_outputs", "--network_train_unet_only",
                                                     "--output_name", "masked"]) == 0
    assert (out / "masked.safetensors").is_file() and len(seen) == 4
    for mask in seen:
        assert mask is not None and mask.shape == (1, 1, 8, 8)
        matches = [name for name, want in expected.items() if np.allclose(mask[0, 0].numpy(), want, atol=1e-6)]
        assert len(matches) == 1  # exactly one image's mask, R channel only (G and B differ per mask)


def test_masked_loss_is_not_listed_as_without_effect():
    from trainer.cli import build_parser, config_from_args

    said = []
    args = ["--pretrained_model_name_or_path", "f", "--clip_l", "c", "--t5xxl", "t", "--ae", "a", "--train_data_dir",
            "d", "--resolution", "64", "--masked_loss"]
    config = config_from_args(build_parser().parse_args(args), warn=said.append)
    assert config.data.masked_loss and not any("masked_loss" in s for s in said)
    entry = build_parser().format_help().split("\n  --masked_loss", 1)[1].split("\n  --", 1)[0]
    assert "R channel" in entry and "no effect" not in entry


def test_a_batch_mixing_alpha_mask_and_plain_subsets_has_one_mask_per_sample(tmp_path):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    (tmp_path / "alpha").mkdir()
    Image.fromarray(np.dstack([gradient(64, 64), alpha]), "RGBA").save(tmp_path / "alpha" / "a.png")
    rgb(tmp_path / "plain" / "b.png", 64, 64, "b")
    config = DatasetConfig(resolution=(64, 64), batch_size=2, subsets=(
        SubsetConfig(image_dir=str(tmp_path / "alpha"), alpha_mask=True, caption_extension=".txt"),
        SubsetConfig(image_dir=str(tmp_path / "plain"), caption_extension=".txt")))
    batch = FluxDataset(config).batch(0)
    assert batch.alpha_masks.shape == (2, 64, 64)  # not one mask broadcast over both samples
    masks = {p.name: m for p, m in zip(batch.paths, batch.alpha_masks)}
    assert masks["a.png"].max() == 0 and masks["b.png"].min() == 1
