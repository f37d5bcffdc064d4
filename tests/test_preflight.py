"""The pre-flight report (what training will see, without a model) and `--check_only`."""

from trainer.cli import main
from trainer.config import SubsetConfig, TrainConfig
from trainer.config.data import DatasetConfig
from trainer.preflight import preflight_report

from datagen import rgb
from trainspace import cli_args, make_workspace


def test_report_counts_images_captions_skips_buckets_and_steps(tmp_path, tiny_files):
    folder = tmp_path / "images"
    rgb(folder / "wide1.png", 192, 96, caption="a wide one")
    rgb(folder / "wide2.png", 192, 96, caption="another wide one")
    rgb(folder / "square.png", 128, 128, caption=None)  # no caption file: class tokens
    (folder / "broken.png").write_bytes(b"not a png")
    dataset = DatasetConfig(resolution=(128, 128), batch_size=2, enable_bucket=True, min_bucket_reso=64,
                            max_bucket_reso=256, bucket_reso_steps=32,
                            subsets=(SubsetConfig(image_dir=str(folder), num_repeats=3, class_tokens="sks",
                                                  caption_extension=".txt"),))
    config = TrainConfig.from_flags(pretrained_model_name_or_path=str(tiny_files["flux"]),
                                    clip_l=str(tiny_files["clip_l"]),
                                    t5xxl=str(tiny_files["t5xxl"]), ae=str(tiny_files["ae"]), datasets=(dataset,),
                                    max_train_epochs=2, gradient_accumulation_steps=2)
    report = preflight_report(config)
    (d,) = report.datasets
    assert (d.images, d.training_images, d.captioned) == (3, 9, 2)
    assert [p.name for p in d.uncaptioned] == ["square.png"]
    assert [(p.name, "cannot" in why or "not" in why) for p, why in d.skipped] == [("broken.png", True)]
    buckets = {(w, h): n for w, h, n in d.buckets}
    assert sum(buckets.values()) == 9 and buckets[(128, 128)] == 3 and len(buckets) == 2
    # each bucket is batched apart: 6 wide images -> 3 batches, 3 square -> 2
    assert d.batches == report.batches_per_epoch == 5
    assert (report.steps_per_epoch, report.total_steps, report.epochs) == (3, 6, 2)
    text = report.text()
    assert "3 images (9 per epoch with repeats)" in text and "broken.png" in text and "square.png" in text
    assert "6 steps in 2 epoch(s)" in text and "guidance_scale 3.5" in text


def test_check_only_prints_the_report_and_loads_no_model(tmp_path, tokenizer_dirs, monkeypatch, capsys):
    from trainer.models.safetensors_file import SafetensorsFile

    ws = make_workspace(tmp_path / "ws")
    read = []  # every model's weights come through SafetensorsFile.tensor; headers do not
    monkeypatch.setattr(SafetensorsFile, "tensor", lambda self, key: read.append(key))
    assert main(cli_args(ws, tokenizer_dirs, tmp_path / "out") + ["--check_only"]) == 0
    out = capsys.readouterr().out
    assert "8 images (8 per epoch with repeats)" in out and "bucket 64x64: 8 images" in out
    assert "no model was loaded" in out and not (tmp_path / "out").exists() and read == []
    bad = cli_args(ws, tokenizer_dirs, tmp_path / "out") + ["--check_only", "--ae", str(ws["clip_l"])]
    assert main(bad) == 2
    assert "expected the FLUX autoencoder" in capsys.readouterr().err


def test_free_space_is_told_in_units_that_show_it(tmp_path, tiny_files, tokenizer_dirs, monkeypatch):
    import collections

    import pytest

    from trainer import preflight
    from trainer.errors import ConfigError
    from trainer.preflight import check, size_text

    from trainspace import config as train_config

    assert [size_text(n) for n in (0, 1, 812, 3584, 2**20, 120 * 2**20, 5.5 * 2**30)] == [
        "0 bytes", "1 byte", "812 bytes", "3.5 KiB", "1 MiB", "120 MiB", "5.5 GiB"]
    ws = make_workspace(tmp_path / "ws")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(ConfigError, match=r"output_dir .*: 100 bytes free, but the LoRA files and training states "
                                          r"need about \d+(\.\d)? KiB"):
        check(train_config(ws, tokenizer_dirs, tmp_path / "out"))


def test_prompt_file_problems_are_in_the_preflight(tmp_path, tokenizer_dirs, capsys):
    ws = make_workspace(tmp_path / "ws")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --s abc\na dog --zz 3\n")
    argv = cli_args(ws, tokenizer_dirs, tmp_path / "out") + ["--check_only", "--sample_prompts", str(prompts)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warning: sample prompt 1 (prompts.txt line 1): --s abc: expects a whole number" in out
    assert "warning: sample prompt 2 (prompts.txt line 2): --zz 3: not a flag" in out
    warned = []
    from trainer.preflight import check

    from trainspace import config as train_config

    check(train_config(ws, tokenizer_dirs, tmp_path / "out", sample_prompts=str(prompts)), warn=warned.append)
    assert len(warned) == 2 and "--s abc" in warned[0]  # the loop passes its reporter: said before any model loads


def test_deeply_nested_prompt_files_are_named(tmp_path, tokenizer_dirs, capsys):
    ws = make_workspace(tmp_path / "ws")
    for name, content in (("deep.toml", "prompt = " + "[" * 100_000), ("deep.json", "[" * 100_000)):
        prompts = tmp_path / name
        prompts.write_text(content)
        argv = cli_args(ws, tokenizer_dirs, tmp_path / "out") + ["--check_only", "--sample_prompts", str(prompts)]
        assert main(argv) == 2  # deep.json needs sampling.py's loads_json
        assert f"{prompts}: not valid" in capsys.readouterr().err
