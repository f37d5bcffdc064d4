"""Subset options that change what a batch holds: alpha masks, fine-tune metadata captions, network multiplier,
colour augmentation, resize interpolation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DatasetConfig, SubsetConfig
from trainer.data import DatasetGroup, FluxDataset, cache_latents, single_folder_dataset
from trainer.models import load_autoencoder

from datagen import gradient, rgb, save


def test_alpha_mask_reaches_the_batch_and_the_latent_cache(tmp_path, tiny_files):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    save(Image.fromarray(np.dstack([gradient(64, 64), alpha]), "RGBA"), tmp_path / "a.png", "masked")
    rgb(tmp_path / "b.png", 64, 64, "opaque")
    dataset = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt", alpha_mask=True, batch_size=2))
    batch = dataset.batch(0)
    masks = {p.name: m for p, m in zip(batch.paths, batch.alpha_masks)}
    assert masks["a.png"][:, :32].max() == 0 and masks["a.png"][:, 32:].min() == 1 and masks["b.png"].min() == 1
    ae = load_autoencoder(tiny_files["ae"], dtype=torch.float32)
    cache_latents(DatasetGroup([dataset]), ae, to_disk=True)
    assert "alpha_mask_8x8" in np.load(tmp_path / "a_0064x0064_flux.npz")
    cached = dataset.batch(0)
    assert cached.latents is not None and torch.equal(cached.alpha_masks, batch.alpha_masks)


def test_alpha_mask_weighs_the_loss():
    from trainer.flow import FlowConfig, alpha_mask_for_latents, batch_loss

    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1
    latent_mask = alpha_mask_for_latents(mask, 8, 8)
    prediction, target = torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8)
    target[..., :4] = 5.0  # errors only where the mask is zero
    assert batch_loss(prediction, target, FlowConfig(), torch.rand(1), mask=latent_mask).item() == 0.0


def test_metadata_file_captions(tmp_path):
    for name in ("one", "two"):
        rgb(tmp_path / "img" / f"{name}.png", 64, 64, caption=None)
    (tmp_path / "meta.json").write_text(json.dumps({
        "one": {"caption": "a photo", "tags": "tag1, tag2"}, str(tmp_path / "img" / "two.png"): {"tags": "only tags"},
        "missing": {"caption": "x"}}))
    config = DatasetConfig(resolution=(64, 64), subsets=(SubsetConfig(metadata_file=str(tmp_path / "meta.json"),
                                                                      image_dir=str(tmp_path / "img")),))
    captions = {i.path.name: i.caption for i in FluxDataset(config).items}
    assert captions == {"one.png": "a photo, tag1, tag2", "two.png": "only tags"}


def test_network_multiplier_and_color_aug(tmp_path):
    rgb(tmp_path / "a.png", 64, 64, "x")
    plain = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt", network_multiplier=0.5))
    assert plain.batch(0).network_multiplier == 0.5
    augmented = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt", color_aug=True,
                                                  num_repeats=30))
    changed = sum(not torch.equal(augmented.batch(i).images, plain.batch(0).images) for i in range(len(augmented)))
    assert 3 <= changed <= 20  # about a third of the draws change the colours


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos", "area", "box"])
def test_resize_interpolation_is_applied(tmp_path, interpolation):
    rgb(tmp_path / "big.png", 128, 128, "x", seed=4)
    dataset = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt",
                                                resize_interpolation=interpolation))
    pixels, _ = dataset.load_image(dataset.items[0])
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
               "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}
    expected = np.asarray(Image.open(tmp_path / "big.png").convert("RGB").resize((64, 64), filters[interpolation]))
    assert np.array_equal(pixels, expected)
