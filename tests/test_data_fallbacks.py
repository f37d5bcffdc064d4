"""The command line as sd-scripts' fallback layer for every dataset and subset option (subset > dataset > [general] >
command line > default), for a dataset TOML or JSON and for --train_data_dir / --reg_data_dir / --in_json; the
bucket rules (min/max rounded to the step, resolution within them); 1-based caption-dropout epochs; custom_attributes
in the batch; the train/validation split."""

import json
import logging
import math
import random

import pytest

from trainer.config import TrainConfig, resolve_datasets
from trainer.data import (
    DatasetConfig,
    DatasetConfigError,
    FluxDataset,
    SubsetConfig,
    build_datasets,
    build_validation_datasets,
    load_dataset_config,
    single_folder_dataset,
)
from trainer.data.buckets import BucketPlanner, bucket_resolutions
from trainer.errors import ConfigError

from datagen import rgb

MODELS = dict(pretrained_model_name_or_path="f.safetensors", clip_l="c.safetensors", t5xxl="t.safetensors",
              ae="a.safetensors")

# every command-line dataset option with a value away from its default
COMMAND_LINE = dict(shuffle_caption=True, caption_separator=";", keep_tokens=2, keep_tokens_separator="|||",
                    secondary_separator=";;;", enable_wildcard=True, caption_prefix="pre", caption_suffix="post",
                    color_aug=True, flip_aug=True, face_crop_aug_range="2.0,4.5", random_crop=True,
                    resize_interpolation="bicubic", token_warmup_min=3, token_warmup_step=0.5, alpha_mask=True,
                    caption_dropout_rate=0.1, caption_dropout_every_n_epochs=4, caption_tag_dropout_rate=0.2,
                    cache_info=True, caption_extension=".cli", dataset_repeats=3, validation_split=0.25,
                    validation_seed=11, train_batch_size=5, resolution=(512, 512), enable_bucket=True,
                    min_bucket_reso=128, max_bucket_reso=768, bucket_reso_steps=32, bucket_no_upscale=True,
                    prior_loss_weight=0.5)
EXPECTED_SUBSET = dict(shuffle_caption=True, caption_separator=";", keep_tokens=2, keep_tokens_separator="|||",
                       secondary_separator=";;;", enable_wildcard=True, caption_prefix="pre", caption_suffix="post",
                       color_aug=True, flip_aug=True, face_crop_aug_range=(2.0, 4.5), random_crop=True,
                       resize_interpolation="bicubic", token_warmup_min=3, token_warmup_step=0.5, alpha_mask=True,
                       caption_dropout_rate=0.1, caption_dropout_every_n_epochs=4, caption_tag_dropout_rate=0.2,
                       cache_info=True, caption_extension=".cli", num_repeats=3)
EXPECTED_DATASET = dict(batch_size=5, resolution=(512, 512), enable_bucket=True, min_bucket_reso=128,
                        max_bucket_reso=768, bucket_reso_steps=32, bucket_no_upscale=True, prior_loss_weight=0.5,
                        validation_split=0.25, validation_seed=11, resize_interpolation="bicubic")


def make(**overrides) -> TrainConfig:
    return TrainConfig.from_flags(**{**MODELS, **overrides})


def values(config, names):
    return {name: getattr(config, name) for name in names}


def test_every_command_line_option_reaches_toml_subsets_and_datasets(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    (dataset,) = resolve_datasets(make(dataset_config=str(toml), **COMMAND_LINE))
    assert values(dataset.subsets[0], EXPECTED_SUBSET) == EXPECTED_SUBSET
    assert values(dataset, EXPECTED_DATASET) == EXPECTED_DATASET


def test_the_file_wins_over_the_command_line(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\nflip_aug = false\ncaption_separator = ","\nvalidation_split = 0.5\n'
                    '[[datasets]]\nresolution = 256\nbatch_size = 2\nkeep_tokens = 1\nmax_bucket_reso = 512\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tmp_path}"\nnum_repeats = 7\nface_crop_aug_range = [1.0, 2.0]'
                    '\ncaption_dropout_every_n_epochs = 2\ncustom_attributes = {diff_output_preservation = true}\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    (dataset,) = resolve_datasets(make(dataset_config=str(toml), **COMMAND_LINE))
    first, second = dataset.subsets
    assert (dataset.resolution, dataset.batch_size, dataset.max_bucket_reso, dataset.validation_split) == (
        (256, 256), 2, 512, 0.5)
    assert dataset.min_bucket_reso == 128 and dataset.validation_seed == 11  # not in the file: command line
    assert (first.num_repeats, first.face_crop_aug_range, first.caption_dropout_every_n_epochs) == (7, (1.0, 2.0), 2)
    assert first.custom_attributes == {"diff_output_preservation": True} and second.custom_attributes is None
    assert second.num_repeats == 3 and second.caption_dropout_every_n_epochs == 4  # --dataset_repeats; command line
    for subset in (first, second):
        assert subset.flip_aug is False and subset.caption_separator == "," and subset.keep_tokens == 1
        assert subset.alpha_mask is True  # subset-only in a file, still given by the command line (as sd-scripts)


def test_train_data_dir_with_reg_data_dir(tmp_path):
    (tmp_path / "train" / "4_sks dog").mkdir(parents=True)
    (tmp_path / "train" / "2_other").mkdir()
    (tmp_path / "train" / "notes").mkdir()
    (tmp_path / "train" / "0_skipped").mkdir()
    (tmp_path / "reg" / "10_dog").mkdir(parents=True)
    (dataset,) = resolve_datasets(make(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                                       **COMMAND_LINE))
    got = [(s.image_dir.rsplit("/", 1)[-1], s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert got == [("2_other", 2, "other", False), ("4_sks dog", 4, "sks dog", False), ("10_dog", 10, "dog", True)]
    assert values(dataset, EXPECTED_DATASET) == EXPECTED_DATASET  # prior_loss_weight 0.5 for the reg subset
    expected = {**EXPECTED_SUBSET}
    expected.pop("num_repeats")  # from the folder names
    assert all(values(s, expected) == expected for s in dataset.subsets)
    with pytest.raises(ConfigError, match="reg_data_dir"):
        resolve_datasets(make(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "nope"),
                              resolution=(512, 512)))


def test_train_data_dir_with_in_json_is_one_fine_tune_subset(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    (dataset,) = resolve_datasets(make(train_data_dir=str(tmp_path), in_json=str(tmp_path / "meta.json"),
                                       dataset_repeats=6, resolution=(256, 256), caption_prefix="p"))
    (subset,) = dataset.subsets
    assert (subset.image_dir, subset.metadata_file, subset.num_repeats, subset.caption_prefix) == (
        str(tmp_path), str(tmp_path / "meta.json"), 6, "p")


def test_folder_options_given_with_a_dataset_config_are_ignored_with_a_warning(tmp_path, caplog):
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    with caplog.at_level(logging.WARNING):
        (dataset,) = resolve_datasets(make(dataset_config=str(toml), reg_data_dir=str(tmp_path)))
    assert not any(s.is_reg for s in dataset.subsets) and "--reg_data_dir" in caplog.text


@pytest.mark.parametrize("text", ["2", "4,2", "a,b", "1,2,3"])
def test_face_crop_aug_range_text_is_checked(tmp_path, text):
    with pytest.raises(ConfigError, match="face_crop_aug_range"):
        resolve_datasets(make(train_data_dir=str(tmp_path), resolution=(64, 64), face_crop_aug_range=text))


# ------------------------------------------------------------------------------------------------ JSON

def test_json_dataset_config_reads_like_toml(tmp_path):
    document = {"general": {"caption_extension": ".txt", "flip_aug": True},
                "datasets": [{"resolution": [512, 768], "batch_size": 2,
                              "subsets": [{"image_dir": str(tmp_path), "num_repeats": 3,
                                           "custom_attributes": {"diff_output_preservation": True}}]}]}
    path = tmp_path / "dataset.JSON"
    path.write_text(json.dumps(document))
    toml = tmp_path / "dataset.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\nflip_aug = true\n[[datasets]]\nresolution = [512, 768]\n'
                    f'batch_size = 2\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\nnum_repeats = 3\n'
                    'custom_attributes = {diff_output_preservation = true}\n')
    assert load_dataset_config(path) == load_dataset_config(toml)
    (dataset,) = resolve_datasets(make(dataset_config=str(path), caption_prefix="cli"))
    assert dataset.subsets[0].caption_prefix == "cli" and dataset.subsets[0].flip_aug


@pytest.mark.parametrize("text,fragments", [
    ('{"datasets": [', ["not valid JSON"]),
    ('[1, 2]', ["JSON object"]),
    ('{"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", "flip_augment": true}]}]}',
     ["[[datasets.subsets]] #1", "unknown key 'flip_augment'"]),
    ('{"datasets": [{"resolution": 512.5, "subsets": [{"image_dir": "x"}]}]}', ["'resolution' = 512.5"]),
    ('{"datasets": [{"resolution": 512, "subsets": ["x"]}]}', ["[[datasets.subsets]] #1", "must be a table"]),
])
def test_json_errors_name_the_file(tmp_path, text, fragments):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(path)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------ buckets

def test_min_and_max_bucket_reso_are_rounded_to_the_step_like_sd_scripts(caplog):
    with caplog.at_level(logging.WARNING):
        config = DatasetConfig(resolution=(512, 512), enable_bucket=True, min_bucket_reso=300, max_bucket_reso=1000,
                               subsets=(SubsetConfig(image_dir="x"),))
    assert (config.min_bucket_reso, config.max_bucket_reso) == (256, 1024)  # min down, max up
    assert "rounded down to 256" in caplog.text and "rounded up to 1024" in caplog.text


@pytest.mark.parametrize("low,high", [(256, 1000), (300, 1000), (256, 1024)])
def test_every_bucket_is_a_multiple_of_the_step(low, high):
    config = DatasetConfig(resolution=(512, 512), enable_bucket=True, min_bucket_reso=low, max_bucket_reso=high,
                           subsets=(SubsetConfig(image_dir="x"),))
    planner = BucketPlanner(config.resolution, config.min_bucket_reso, config.max_bucket_reso, 64)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in planner.predefined)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in bucket_resolutions((512, 512), low, high, 64))


def test_images_of_every_shape_land_in_stepped_buckets(tmp_path):
    for i, (w, h) in enumerate([(320, 748), (1000, 300), (640, 480), (97, 1000)]):
        rgb(tmp_path / f"{i}.png", w, h)
    dataset = FluxDataset(single_folder_dataset(tmp_path, 512, enable_bucket=True, min_bucket_reso=300,
                                                max_bucket_reso=1000, caption_extension=".txt"))
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in dataset.buckets)


@pytest.mark.parametrize("options,fragments", [
    (dict(resolution=(512, 512), min_bucket_reso=640, max_bucket_reso=1024), ["'resolution'", "'min_bucket_reso'"]),
    (dict(resolution=(512, 256), min_bucket_reso=320), ["'resolution' [512, 256]", "'min_bucket_reso' 320"]),
    (dict(resolution=(1024, 1024), max_bucket_reso=768), ["'resolution'", "'max_bucket_reso' 768"]),
    (dict(resolution=(1024, 1024), max_bucket_reso=768, bucket_no_upscale=True), ["'max_bucket_reso' 768"]),
    (dict(resolution=(512, 512), bucket_reso_steps=24), ["'bucket_reso_steps' = 24", "multiple of 16"]),
])
def test_resolution_outside_the_bucket_range_is_refused(options, fragments):
    with pytest.raises(DatasetConfigError) as info:
        DatasetConfig(enable_bucket=True, subsets=(SubsetConfig(image_dir="x"),), **options)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_resolution_outside_the_range_without_buckets_is_fine():
    config = DatasetConfig(resolution=(128, 128), min_bucket_reso=256, subsets=(SubsetConfig(image_dir="x"),))
    assert config.min_bucket_reso == 256


def test_resolution_below_min_bucket_reso_names_the_file(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nresolution = 256\nenable_bucket = true\nmin_bucket_reso = 320\n'
                    '[[datasets.subsets]]\nimage_dir = "x"\n')
    with pytest.raises(DatasetConfigError, match=r"d.toml \[\[datasets\]\] #1: 'resolution' \[256, 256\] is below"):
        load_dataset_config(toml)


# ------------------------------------------------------------------------------------------------ captions, batches

def test_caption_dropout_every_n_epochs_counts_epochs_from_one(tmp_path):
    rgb(tmp_path / "a.png", 64, 64, "a caption")
    dataset = FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt",
                                                caption_dropout_every_n_epochs=2))
    captions = []
    for epoch in range(6):  # 0-based loop epochs: epochs 2, 4, 6 as sd-scripts counts them
        dataset.set_epoch(epoch)
        captions.append(dataset.batch(0).captions[0])
    assert captions == ["a caption", "", "a caption", "", "a caption", ""]


def test_custom_attributes_reach_each_sample_of_the_batch(tmp_path):
    for folder, attributes in (("a", {"diff_output_preservation": True}), ("b", None)):
        rgb(tmp_path / folder / "x.png", 64, 64)
    config = DatasetConfig(resolution=(64, 64), batch_size=2, subsets=(
        SubsetConfig(image_dir=str(tmp_path / "a"), caption_extension=".txt",
                     custom_attributes={"diff_output_preservation": True}),
        SubsetConfig(image_dir=str(tmp_path / "b"), caption_extension=".txt")))
    batch = FluxDataset(config).batch(0)
    got = {p.parent.name: attributes for p, attributes in zip(batch.paths, batch.custom_attributes)}
    assert got == {"a": {"diff_output_preservation": True}, "b": {}}


# ------------------------------------------------------------------------------------------------ validation split

def folder_of(tmp_path, count, name="img"):
    for i in range(count):
        rgb(tmp_path / name / f"{i:02d}.png", 64, 64, f"image {i}", seed=i)
    return tmp_path / name


def test_split_of_a_quarter_of_eight_images(tmp_path):
    config = single_folder_dataset(folder_of(tmp_path, 8), 64, caption_extension=".txt", validation_split=0.25,
                                   num_repeats=3)
    train = FluxDataset(config, seed=5)
    (validation,) = build_validation_datasets([config], seed=5).datasets
    train_paths = {i.path for i in train.items}
    held = {i.path for i in validation.items}
    assert len(train_paths) == 6 and len(held) == 2 and not train_paths & held and set(train.held_out) == held
    assert sum(i.repeats for i in train.items) == 18 and all(i.repeats == 1 for i in validation.items)
    assert train.summary()["num_train_images"] == 18 and len(validation) == 2  # batches of one


def test_split_is_sd_scripts_permutation_of_the_sorted_paths(tmp_path):
    folder = folder_of(tmp_path, 10)
    config = single_folder_dataset(folder, 64, caption_extension=".txt", validation_split=0.3, validation_seed=42)
    paths = sorted(folder.glob("*.png"))
    state = random.getstate()
    random.seed(42)  # sd-scripts' split_train_val with a validation seed
    random.shuffle(paths)
    random.setstate(state)
    keep = math.ceil(len(paths) * (1 - 0.3))
    assert sorted(i.path for i in FluxDataset(config, seed=999).items) == sorted(paths[:keep])
    (validation,) = build_validation_datasets([config], seed=999).datasets
    assert sorted(i.path for i in validation.items) == sorted(paths[keep:])


def test_split_seed_defaults_to_the_training_seed(tmp_path):
    folder = folder_of(tmp_path, 12)
    held = {seed: set(FluxDataset(single_folder_dataset(folder, 64, caption_extension=".txt", validation_split=0.25),
                                  seed=seed).held_out) for seed in (1, 2)}
    explicit = FluxDataset(single_folder_dataset(folder, 64, caption_extension=".txt", validation_split=0.25,
                                                 validation_seed=1), seed=2)
    assert held[1] != held[2] and set(explicit.held_out) == held[1]


def test_each_subset_is_split_and_regularisation_images_are_not(tmp_path):
    config = DatasetConfig(resolution=(64, 64), validation_split=0.5, subsets=(
        SubsetConfig(image_dir=str(folder_of(tmp_path, 4, "a")), caption_extension=".txt"),
        SubsetConfig(image_dir=str(folder_of(tmp_path, 6, "b")), caption_extension=".txt"),
        SubsetConfig(image_dir=str(folder_of(tmp_path, 3, "reg")), caption_extension=".txt", is_reg=True)))
    train = FluxDataset(config)
    (validation,) = build_validation_datasets([config]).datasets
    count = {}
    for item in train.items:
        count[item.path.parent.name] = count.get(item.path.parent.name, 0) + 1
    assert count == {"a": 2, "b": 3, "reg": 3}
    assert sorted(i.path.parent.name for i in validation.items) == ["a", "a", "b", "b", "b"]
    # regularisation images are balanced against the 5 training images that remain
    assert sum(i.repeats for i in train.items if i.subset.is_reg) == 5


def test_no_validation_set_when_nothing_is_held_out(tmp_path, caplog):
    config = single_folder_dataset(folder_of(tmp_path, 2), 64, caption_extension=".txt", validation_split=0.25)
    assert len(FluxDataset(config).items) == 2  # ceil(2 x 0.75) = 2: every image trains
    with caplog.at_level(logging.WARNING):
        assert build_validation_datasets([config]) is None
    assert "holds out no image" in caplog.text
    assert build_validation_datasets([single_folder_dataset(tmp_path / "img", 64)]) is None  # no split at all


def test_held_out_images_are_never_in_training_batches(tmp_path):
    configs = [single_folder_dataset(folder_of(tmp_path, 9), 64, caption_extension=".txt", validation_split=0.34,
                                     batch_size=2, num_repeats=2, flip_aug=True)]
    group = build_datasets(configs, seed=3)
    held = {i.path for i in build_validation_datasets(configs, seed=3).items()}
    assert len(held) == 3
    seen = set()
    for epoch in range(4):
        group.set_epoch(epoch)
        for index in range(len(group)):
            seen |= set(group.batch(index).paths)
    assert len(seen) == 6 and not seen & held


@pytest.mark.parametrize("split", [-0.1, 1.0, 1.5])
def test_validation_split_outside_zero_to_one_is_refused(tmp_path, split):
    toml = tmp_path / "d.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\nvalidation_split = {split}\n"
                    "[[datasets.subsets]]\nimage_dir = \"x\"\n")
    with pytest.raises(DatasetConfigError, match="'validation_split'"):
        load_dataset_config(toml)
