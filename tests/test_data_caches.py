"""Latent and text-encoder caches: sd-scripts' file names and keys, round trips, reuse, invalidation, truncated
files never trusted, interrupted caching continued, conflicts named."""

import numpy as np
import pytest
import torch

from trainer.data import (
    DatasetError,
    FluxDataset,
    cache_latents,
    cache_text_outputs,
    latent_npz_path,
    single_folder_dataset,
    text_npz_path,
)
from trainer.data.dataset import DatasetGroup
from trainer.models import load_autoencoder, load_clip_l, load_t5xxl

from datagen import rgb


@pytest.fixture(scope="module")
def ae(tiny_files):
    return load_autoencoder(tiny_files["ae"], dtype=torch.float32)


@pytest.fixture(scope="module")
def encoders(tiny_files, tokenizer_dirs):
    clip = load_clip_l(tiny_files["clip_l"], dtype=torch.float32, tokenizer=tokenizer_dirs["clip_l"])
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], max_length=16)
    return clip, t5


def folder_of(tmp_path, count=3):
    for i in range(count):
        rgb(tmp_path / f"img{i}.png", 64 + 16 * i, 64, caption=f"caption {i}", seed=i)
    return tmp_path


def group(folder, **options):
    opts = dict(caption_extension=".txt", enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=16)
    return DatasetGroup([FluxDataset(single_folder_dataset(folder, 64, **{**opts, **options}))])


def test_latents_on_disk_use_sd_scripts_names_and_keys(tmp_path, ae):
    folder = folder_of(tmp_path)
    g = group(folder, flip_aug=True)
    stats = cache_latents(g, ae, to_disk=True, batch_size=2)
    assert stats == {"encoded": 3, "reused": 0}
    item = g.datasets[0].items[1]
    path = latent_npz_path(item.path, item.size)
    assert path.name == "img1_0080x0064_flux.npz" and path == item.latent_npz
    data = np.load(path)
    h, w = item.bucket[1] // 8, item.bucket[0] // 8
    assert data[f"latents_{h}x{w}"].shape == (16, h, w) and data[f"latents_{h}x{w}"].dtype == np.float32
    assert f"latents_flipped_{h}x{w}" in data and list(data[f"original_size_{h}x{w}"]) == [80, 64]
    assert f"crop_ltrb_{h}x{w}" in data
    with torch.no_grad():
        pixels, _ = g.datasets[0].load_image(item)
        mean = ae.encode(torch.from_numpy(pixels.transpose(2, 0, 1) / 127.5 - 1).float()[None], sample=False)
    assert (torch.from_numpy(data[f"latents_{h}x{w}"]) - mean[0]).abs().mean() < 0.5  # a sample near the mean
    batch = g.datasets[0].batch(0)
    assert batch.latents is not None and batch.images is None


def test_memory_cache_equals_disk_cache(tmp_path, ae):
    folder = folder_of(tmp_path)
    disk, memory = group(folder), group(folder)
    cache_latents(disk, ae, to_disk=True, batch_size=1, seed=3)
    cache_latents(memory, ae, to_disk=False, batch_size=1, seed=3)
    for a, b in zip(disk.datasets[0].items, memory.datasets[0].items):
        h, w = a.bucket[1] // 8, a.bucket[0] // 8
        assert np.array_equal(np.load(a.latent_npz)[f"latents_{h}x{w}"], b.latents["latents"])


def test_reuse_invalidation_and_truncation(tmp_path, ae):
    folder = folder_of(tmp_path)
    cache_latents(group(folder), ae, to_disk=True)
    assert cache_latents(group(folder), ae, to_disk=True) == {"encoded": 0, "reused": 3}
    rgb(folder / "img0.png", 64, 64, caption="caption 0", seed=99)  # same size, new content
    npz = folder / "img2_0096x0064_flux.npz"
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    assert cache_latents(group(folder), ae, to_disk=True) == {"encoded": 2, "reused": 1}
    assert cache_latents(group(folder, flip_aug=True), ae, to_disk=True)["encoded"] == 3  # flipped latents missing


def test_one_file_serves_several_resolutions(tmp_path, ae):
    folder = folder_of(tmp_path, count=1)
    for resolution in (64, 128):
        g = DatasetGroup([FluxDataset(single_folder_dataset(folder, resolution, caption_extension=".txt"))])
        cache_latents(g, ae, to_disk=True)
    keys = set(np.load(folder / "img0_0064x0064_flux.npz").files)
    assert {"latents_8x8", "latents_16x16"} <= keys


def test_interrupted_caching_continues(tmp_path, ae):
    folder = folder_of(tmp_path, count=4)

    def stop_after_first(phase, done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_latents(group(folder), ae, to_disk=True, progress=stop_after_first)
    assert cache_latents(group(folder), ae, to_disk=True) == {"encoded": 3, "reused": 1}
    assert not list(folder.glob("*.tmp"))


def test_latent_caching_conflicts(tmp_path, ae):
    folder = folder_of(tmp_path, count=1)
    for option in ("color_aug", "random_crop"):
        with pytest.raises(DatasetError, match=f"{option} changes the image every step"):
            cache_latents(group(folder, **{option: True}), ae, to_disk=False)


def test_text_outputs_on_disk(tmp_path, encoders):
    clip, t5 = encoders
    folder = folder_of(tmp_path)
    g = group(folder, caption_prefix="photo of")
    assert cache_text_outputs(g, clip, t5, to_disk=True, batch_size=2,
                              apply_t5_attn_mask=True) == {"encoded": 3, "reused": 0}
    item = g.datasets[0].items[0]
    assert item.text_npz == text_npz_path(item.path) and item.text_npz.name == "img0_flux_te.npz"
    data = np.load(item.text_npz)
    assert data["l_pooled"].shape == (64,) and data["t5_out"].shape == (16, 32) and data["txt_ids"].shape == (16, 3)
    assert data["t5_attn_mask"].shape == (16,) and bool(data["apply_t5_attn_mask"])
    with torch.no_grad():
        expected = clip.encode("photo of caption 0")[0]
    assert torch.allclose(torch.from_numpy(data["l_pooled"]), expected, atol=1e-6)
    batch = g.datasets[0].batch(0)
    assert batch.text is not None and batch.text[1].shape == (1, 16, 32)

    assert cache_text_outputs(group(folder, caption_prefix="photo of"), clip, t5, True,
                              apply_t5_attn_mask=True)["reused"] == 3
    assert cache_text_outputs(group(folder, caption_prefix="photo of"), clip, t5, True)["encoded"] == 3  # mask flag
    (folder / "img1.txt").write_text("a new caption\n")
    assert cache_text_outputs(group(folder, caption_prefix="photo of"), clip, t5, True)["encoded"] == 1


@pytest.mark.parametrize("option,value", [("shuffle_caption", True), ("caption_dropout_rate", 0.1),
                                          ("caption_tag_dropout_rate", 0.2), ("caption_dropout_every_n_epochs", 3)])
def test_text_caching_conflicts(tmp_path, encoders, option, value):
    with pytest.raises(DatasetError, match=f"{option}.*cannot be cached"):
        cache_text_outputs(group(folder_of(tmp_path, 1), **{option: value}), *encoders, to_disk=False)


def test_text_caching_with_train_t5xxl_is_refused():
    from trainer.data.text_cache import check_text_caching

    with pytest.raises(DatasetError, match="train_t5xxl"):
        check_text_caching(None, train_t5xxl=True)


def test_images_sharing_a_cache_file_are_refused_naming_both(tmp_path, ae):
    """x.png and x.jpg of one size in one folder: sd-scripts' name (stem and size) is one file for both."""
    rgb(tmp_path / "x.png", 64, 64, caption="png", seed=1)
    rgb(tmp_path / "x.jpg", 64, 64, caption=None, seed=2)
    rgb(tmp_path / "y.png", 64, 64, caption="other", seed=3)
    g = group(tmp_path)
    with pytest.raises(DatasetError, match=r"x\.(png|jpg) and .*x\.(png|jpg) would share the latent cache file "
                                           r"x_0064x0064_flux\.npz"):
        cache_latents(g, ae, to_disk=True)
    assert not list(tmp_path.glob("*.npz"))  # refused before anything was encoded
    assert cache_latents(g, ae, to_disk=False)["encoded"] == 3  # in memory each image has its own entry


def test_different_sizes_of_one_stem_keep_sd_scripts_names(tmp_path, ae):
    rgb(tmp_path / "x.png", 64, 64, caption="png", seed=1)
    rgb(tmp_path / "x.jpg", 80, 64, caption=None, seed=2)
    cache_latents(group(tmp_path), ae, to_disk=True)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["x_0064x0064_flux.npz", "x_0080x0064_flux.npz"]


def test_an_autoencoder_with_other_downsampling_caches_and_trains(tmp_path, tokenizer_dirs, golden):
    """The reference tiny autoencoder halves the size once (FLUX's thrice): the posterior noise and the reuse check
    follow the model's own downscale."""
    from trainer.events import SilentReporter
    from trainer.loop import train

    from trainspace import config as train_config
    from trainspace import make_workspace

    reference = load_autoencoder(golden / "ae_tiny_weights.safetensors", dtype=torch.float32)
    g = group(folder_of(tmp_path / "images", count=2))
    assert cache_latents(g, reference, to_disk=True)["encoded"] == 2
    item = g.datasets[0].items[0]
    assert np.load(item.latent_npz)["latents_8x8"].shape == (16, 32, 32)  # bucket 64x64, keys in FLUX's 8
    assert cache_latents(g, reference, to_disk=True) == {"encoded": 0, "reused": 2}
    ws = make_workspace(tmp_path / "ws")
    train(train_config(ws, tokenizer_dirs, tmp_path / "out", ae=str(golden / "ae_tiny_weights.safetensors"),
                       max_train_steps=2, cache_latents_to_disk=True), SilentReporter())
    assert (tmp_path / "out" / "test_lora.safetensors").is_file()


def test_an_autoencoder_with_other_downsampling_trains_without_caches(tmp_path, tokenizer_dirs, golden):
    """Latents encoded each step (no cache) take the posterior noise's shape from the model too (step.py)."""
    from trainer.events import SilentReporter
    from trainer.loop import train

    from trainspace import config as train_config
    from trainspace import make_workspace

    ws = make_workspace(tmp_path / "ws")
    train(train_config(ws, tokenizer_dirs, tmp_path / "out", ae=str(golden / "ae_tiny_weights.safetensors"),
                       max_train_steps=2, cache_latents=False), SilentReporter())
    assert (tmp_path / "out" / "test_lora.safetensors").is_file()
