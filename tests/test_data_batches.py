"""Batches are drawn within one bucket, shuffled per epoch from the seed; repeats, regularisation balance and
loss weights follow sd-scripts."""

import pytest
import torch

from trainer.config import DatasetConfig, SubsetConfig
from trainer.data import FluxDataset, load_dataset_config, single_folder_dataset

from datagen import rgb


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    sizes = [(64, 64), (64, 64), (64, 64), (96, 64), (96, 64), (64, 96), (64, 96), (64, 96), (80, 80)]
    for i, (w, h) in enumerate(sizes):
        rgb(root / f"img{i}.png", w, h, caption=f"image {i}, tag{i % 3}", seed=i)
    return root


def make(folder, **options):
    defaults = dict(caption_extension=".txt", enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                    bucket_reso_steps=16, batch_size=2)
    return FluxDataset(single_folder_dataset(folder, 64, **{**defaults, **options}), seed=42)


def test_every_batch_holds_one_bucket_and_every_image_once_per_repeat(folder):
    dataset = make(folder, num_repeats=2)
    seen = []
    for i in range(len(dataset)):
        batch = dataset.batch(i)
        assert batch.images.shape[-2:] == (batch.bucket[1], batch.bucket[0])
        assert len(batch.paths) <= 2
        seen += [p.name for p in batch.paths]
    assert sorted(seen) == sorted(f"img{i}.png" for i in range(9) for _ in range(2))
    assert sum(count for _, count in dataset.bucket_table()) == 18


def test_order_is_shuffled_per_epoch_from_the_seed(folder):
    a, b = make(folder), make(folder)

    def order(d):
        return [tuple(p.name for p in d.batch(i).paths) for i in range(len(d))]

    assert order(a) == order(b)
    first = order(a)
    a.set_epoch(1)
    assert order(a) != first and sorted(sum(order(a), ())) == sorted(sum(first, ()))
    a.set_epoch(0)
    assert order(a) == first


def test_images_are_in_minus_one_to_one(folder):
    batch = make(folder, batch_size=1).batch(0)
    assert batch.images.min() >= -1 and batch.images.max() <= 1 and batch.images.dtype == torch.float32


def test_flip_aug_flips_about_half(folder):
    dataset = make(folder, flip_aug=True, batch_size=1, num_repeats=10)
    flips = [dataset.batch(i).flipped[0] for i in range(len(dataset))]
    assert 0.3 < sum(flips) / len(flips) < 0.7


def test_regularisation_images_balance_and_weigh(tmp_path):
    for i in range(3):
        rgb(tmp_path / "train" / f"t{i}.png", 64, 64, caption="sks dog")
    for i in range(8):
        rgb(tmp_path / "reg" / f"r{i}.png", 64, 64, caption="dog")
    config = DatasetConfig(resolution=(64, 64), batch_size=1, prior_loss_weight=0.5, subsets=(
        SubsetConfig(image_dir=str(tmp_path / "train"), num_repeats=2, caption_extension=".txt"),
        SubsetConfig(image_dir=str(tmp_path / "reg"), is_reg=True, caption_extension=".txt")))
    dataset = FluxDataset(config)
    summary = dataset.summary()
    assert summary["num_train_images"] == 6 and summary["num_reg_images"] == 6  # 6 of the 8 reg images, once
    weights = {dataset.batch(i).paths[0].parent.name: float(dataset.batch(i).loss_weights[0])
               for i in range(len(dataset))}
    assert weights == {"train": 1.0, "reg": 0.5}


def test_summary_counts_tags_and_dirs(folder):
    summary = make(folder).summary()
    assert summary["dataset_dirs"][folder.name] == {"n_repeats": 1, "img_count": 9}
    assert summary["tag_frequency"][folder.name]["tag0"] == 3


def test_seed_guide_datasets_build_three_resolutions(folder, tmp_path):
    text = "\n".join(f'[[datasets]]\nbatch_size = {b}\nenable_bucket = true\nresolution = [{r}, {r}]\n'
                     f'min_bucket_reso = 64\n[[datasets.subsets]]\nimage_dir = "{folder}"\ncaption_extension = ".txt"\n'
                     for b, r in ((2, 128), (3, 96), (4, 64)))
    (tmp_path / "d.toml").write_text(text)
    from trainer.data import build_datasets

    group = build_datasets(load_dataset_config(tmp_path / "d.toml"), seed=1)
    assert [d.config.batch_size for d in group.datasets] == [2, 3, 4]
    sizes = {group.batch(i).bucket for i in range(len(group))}
    assert max(w * h for w, h in sizes) > 96 * 96 and min(w * h for w, h in sizes) <= 64 * 64
    assert len(group) == sum(len(d) for d in group.datasets)
    lines = []
    group.log_buckets(lines.append)
    assert any("bucket 0" in line for line in lines)


def test_batches_split_between_processes(folder):
    dataset = make(folder, batch_size=3)
    assert any(len(indices) == 1 for _, indices in dataset.batches)  # the 80x80 image is alone in its bucket
    for index in range(len(dataset)):
        whole = dataset.batch(index)
        parts = [dataset.batch(index, part=(rank, 2)) for rank in range(2)]
        assert sum((p.paths for p in parts), []) == whole.paths or len(whole.paths) == 1
        assert sum((p.positions for p in parts), []) == whole.positions or len(whole.paths) == 1
        if len(whole.paths) == 1:  # one image, two processes: the second repeats it with weight 0
            assert parts[1].paths == whole.paths and float(parts[1].loss_weights.sum()) == 0
        else:
            assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
