"""sd-scripts dataset TOML, read as sd-scripts reads it, with errors that name file, table, key and choices."""

import pytest

from trainer.data import DatasetConfigError, load_dataset_config

SEED_GUIDE_TOML = """
[general]
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "{dir}"
  num_repeats = 1

[[datasets]]
batch_size = 3
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "{dir}"
  num_repeats = 1

[[datasets]]
batch_size = 4
enable_bucket = true
resolution = [512, 512]

  [[datasets.subsets]]
  image_dir = "{dir}"
  num_repeats = 1
"""


def write(tmp_path, text, name="dataset.toml"):
    path = tmp_path / name
    path.write_text(text.replace("{dir}", str(tmp_path / "images")))
    return path


def test_seed_guide_multi_resolution_toml(tmp_path):
    datasets = load_dataset_config(write(tmp_path, SEED_GUIDE_TOML))
    assert [d.batch_size for d in datasets] == [2, 3, 4]
    assert [d.resolution for d in datasets] == [(1024, 1024), (768, 768), (512, 512)]
    for d in datasets:
        assert d.enable_bucket and len(d.subsets) == 1
        s = d.subsets[0]
        assert s.flip_aug and not s.color_aug and s.keep_tokens_separator == "|||" and s.caption_extension == ".txt"
        assert s.image_dir == str(tmp_path / "images")


def test_lookup_order_subset_dataset_general_command_line_default(tmp_path):
    text = """
[general]
num_repeats = 2
caption_extension = ".general"
[[datasets]]
resolution = 512
caption_extension = ".dataset"
  [[datasets.subsets]]
  image_dir = "a"
  caption_extension = ".subset"
  [[datasets.subsets]]
  image_dir = "b"
[[datasets]]
resolution = [512, 768]
  [[datasets.subsets]]
  image_dir = "c"
  num_repeats = 5
"""
    first, second = load_dataset_config(write(tmp_path, text), {"caption_extension": ".cli", "batch_size": 7,
                                                                  "keep_tokens": 3})
    assert [s.caption_extension for s in first.subsets] == [".subset", ".dataset"]
    assert second.subsets[0].caption_extension == ".general"
    assert [s.num_repeats for s in first.subsets + second.subsets] == [2, 2, 5]
    assert first.batch_size == 7 and first.subsets[0].keep_tokens == 3  # command line below the file
    assert first.resolution == (512, 512) and second.resolution == (512, 768)
    assert first.min_bucket_reso == 256 and first.subsets[0].shuffle_caption is False  # defaults
    default_ext = load_dataset_config(write(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n'
                                                      'image_dir = "x"\n', "d.toml"))
    assert default_ext[0].subsets[0].caption_extension == ".caption"  # sd-scripts' command-line default


@pytest.mark.parametrize("text,fragments", [
    ('[general]\nflip_augment = true\n[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir="x"',
     ["[general]", "unknown key 'flip_augment'", "flip_aug"]),
    ('[[datasets]]\nresolution=512\nbucket_size=2\n[[datasets.subsets]]\nimage_dir="x"',
     ["[[datasets]] #1", "unknown key 'bucket_size'", "batch_size"]),
    ('[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir="x"\nrepeats=3',
     ["[[datasets.subsets]] #1", "unknown key 'repeats'", "num_repeats"]),
    ('[general]\nimage_dir="x"\n[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir="x"',
     ["[general]", "'image_dir'", "belongs in a [[datasets.subsets]] table"]),
    ('[[datasets]]\nresolution=512\nbatch_size="2"\n[[datasets.subsets]]\nimage_dir="x"',
     ["[[datasets]] #1", "'batch_size' = '2'", "expected a whole number"]),
    ('[[datasets]]\nresolution=[512]\n[[datasets.subsets]]\nimage_dir="x"',
     ["'resolution' = [512]", "[width, height]"]),
    ('[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir="x"\nflip_aug="yes"',
     ["[[datasets.subsets]] #1", "'flip_aug'", "true or false"]),
    ('[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir="x"\ncaption_dropout_rate=2',
     ["'caption_dropout_rate'", "between 0 and 1"]),
    ('[[datasets]]\nresolution=512\nresize_interpolation="magic"\n[[datasets.subsets]]\nimage_dir="x"',
     ["'resize_interpolation'", "lanczos"]),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir="x"', ["'resolution' is required"]),
    ('[[datasets]]\nresolution=512\n[[datasets.subsets]]\nnum_repeats=2', ["'image_dir' is required"]),
    ('[[datasets]]\nresolution=512\n', ["at least one [[datasets.subsets]]"]),
    ('[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir="x"\n[[datasets.subsets]]\nmetadata_file="m.json"',
     ["cannot be mixed"]),
    ('[[datasets]]\nresolution = 512\nenable_bucket = true\nbucket_reso_steps = 40\n'
     '[[datasets.subsets]]\nimage_dir="x"',
     ["bucket_reso_steps", "multiple of 16"]),
    ('[[datasets]\nresolution = 512', ["not valid TOML"]),
])
def test_errors_name_file_table_key_and_choices(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_unreadable_file(tmp_path):
    with pytest.raises(DatasetConfigError, match="cannot be read"):
        load_dataset_config(tmp_path / "missing.toml")


def test_keys_read_but_not_applied_are_said(tmp_path, caplog):
    import logging

    text = ('[[datasets]]\nresolution = 512\nvalidation_split = 0.1\n[[datasets.subsets]]\nimage_dir = "x"\n'
            'face_crop_aug_range = [2.0, 4.0]\n')
    with caplog.at_level(logging.WARNING):
        load_dataset_config(write(tmp_path, text))
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "face_crop_aug_range (subset 1)" in message
    assert "validation_split" not in message  # applied: held-out images for the validation loss


def test_repeats_times_images_are_bounded_before_images_are_read(tmp_path, monkeypatch):
    from trainer.data import DatasetError, FluxDataset, single_folder_dataset
    from trainer.data import dataset as dataset_module

    from datagen import rgb

    for i in range(2):
        rgb(tmp_path / f"img{i}.png", 64, 64)
    read = []
    monkeypatch.setattr(dataset_module, "probe_all", lambda paths: read.append(paths) or ({}, {}))
    with pytest.raises(DatasetError, match=rf"subset {tmp_path}: 2 image\(s\) x 600,000 repeat\(s\) = 1,200,000 "
                                           r"samples per epoch, over the limit of 1,000,000; lower num_repeats"):
        FluxDataset(single_folder_dataset(tmp_path, 64, num_repeats=600_000))
    assert read == []  # refused from the file count alone


def test_subsets_together_are_bounded(tmp_path):
    from trainer.config.data import DatasetConfig, SubsetConfig
    from trainer.data import DatasetError, FluxDataset

    from datagen import rgb

    rgb(tmp_path / "img.png", 64, 64)
    subsets = tuple(SubsetConfig(image_dir=str(tmp_path), num_repeats=600_000) for _ in range(2))
    with pytest.raises(DatasetError, match=r"dataset: its subsets' images x repeats = 1,200,000 samples per epoch"):
        FluxDataset(DatasetConfig(subsets=subsets, resolution=(64, 64)))


# deep.json needs config/data.py to read JSON with tomlio.loads_json; utf16/binary need it to use tomlio.read_text
@pytest.mark.parametrize("name, content, message", [
    ("deep.toml", b"a = " + b"[" * 100_000, "not valid TOML (nested more than 100 levels deep"),
    ("deep.json", b"[" * 100_000, "not valid JSON (nested more than 100 levels deep"),
    ("utf16.toml", "[general]\n".encode("utf-16-le"), "holds NUL characters"),
    ("binary.toml", bytes(range(128, 256)), "not UTF-8 text"),
])
def test_settings_files_that_would_end_in_a_traceback_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetConfigError, match=r".*".join(map(__import__("re").escape, (str(path), message)))):
        load_dataset_config(path)


def test_a_utf16_dataset_toml_with_a_bom_is_read(tmp_path):
    path = tmp_path / "windows.toml"  # needs config/data.py's read_text
    path.write_bytes(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path.as_posix()}"\n'
                     .encode("utf-16"))
    assert load_dataset_config(path)[0].resolution == (64, 64)


def test_a_deeply_nested_metadata_file_is_named(tmp_path):
    from trainer.config.data import DatasetConfig, SubsetConfig
    from trainer.data import DatasetError, FluxDataset

    metadata = tmp_path / "meta.json"
    metadata.write_text("{" + '"a": {' * 100_000)
    subset = SubsetConfig(metadata_file=str(metadata), image_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=r"metadata_file .*meta\.json: cannot be read as JSON \(nested more than"):
        FluxDataset(DatasetConfig(subsets=(subset,), resolution=(64, 64)))
