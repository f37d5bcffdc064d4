"""A run never ends with a bad LoRA and never writes over what it reads; bad settings fail before any model loads."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from trainer import session as session_module
from trainer.cli import main
from trainer.errors import ConfigError, NonFiniteError
from trainer.events import Message, SilentReporter, StepEnd
from trainer.loop import train

from trainspace import cli_args, config, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture
def no_model_loads(monkeypatch):
    loaded = []
    for name in ("load_autoencoder", "load_clip_l", "load_t5xxl", "load_flux"):
        monkeypatch.setattr(session_module, name, lambda *a, _n=name, **k: loaded.append(_n))
    return loaded


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for f in folder.rglob("*.safetensors") for t in load_file(f).values())


def test_a_huge_learning_rate_stops_the_run_and_nothing_non_finite_is_written(ws, tokenizer_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    good = out / "test_lora.safetensors"  # a good LoRA that already had the name
    train(config(ws, tokenizer_dirs, out, max_train_steps=1), SilentReporter())
    before = _digest(good)
    args = cli_args(ws, tokenizer_dirs, out) + ["--output_name", "test_lora", "--learning_rate", "1e30",
                                                "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state",
                                                "--network_train_unet_only", "--seed", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: step" in err and "Likely causes" in err and "learning rate too high (1e+30)" in err
    assert _digest(good) == before, "the good LoRA of that name was replaced"
    assert _all_finite(out)


def test_a_non_finite_step_names_its_batch_and_can_be_skipped(ws, tokenizer_dirs, tmp_path, monkeypatch):
    from trainer import flow

    original, calls = flow.batch_loss, []

    def nan_at_third(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(flow, "batch_loss", nan_at_third)
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan\. Likely causes: .*\(\w+_\w+\.png"):
        train(config(ws, tokenizer_dirs, tmp_path / "a", max_train_steps=5), SilentReporter())
    calls.clear()
    reporter = SilentReporter()
    result = train(config(ws, tokenizer_dirs, tmp_path / "b", max_train_steps=5, skip_nonfinite_steps=1), reporter)
    assert result.steps == 5 and len(reporter.of(StepEnd)) == 4
    assert any("step 3: the loss is nan; step skipped (1 of --skip_nonfinite_steps 1)" in m.text
               for m in reporter.of(Message))
    assert _all_finite(tmp_path / "b")


def test_an_output_can_never_replace_an_input(ws, tokenizer_dirs, tmp_path, no_model_loads):
    before = _digest(ws["flux"])
    with pytest.raises(ConfigError, match="would replace --pretrained_model_name_or_path"):
        train(config(ws, tokenizer_dirs, ws["flux"].parent, output_name="flux"), SilentReporter())
    with pytest.raises(ConfigError, match="holds training images"):
        train(config(ws, tokenizer_dirs, ws["root"] / "dataset"), SilentReporter())
    assert _digest(ws["flux"]) == before and not no_model_loads


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "sub/name", "", "CON", "a\x00b", ".."])
def test_an_output_name_is_a_file_name(ws, tokenizer_dirs, tmp_path, name):
    with pytest.raises(ConfigError, match="output_name"):
        config(ws, tokenizer_dirs, tmp_path, output_name=name)


def test_unusable_output_folders_fail_before_any_model_loads(ws, tokenizer_dirs, tmp_path, monkeypatch,
                                                             no_model_loads):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="output_dir .*a_file is a file, not a folder"):
        train(config(ws, tokenizer_dirs, a_file / "out"), SilentReporter())
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r": 1000 bytes free, but the LoRA files and training states need about "
                                          r"\d+ KiB$"):  # small amounts in units that show them, not "0 MiB"
        train(config(ws, tokenizer_dirs, tmp_path / "out"), SilentReporter())
    assert not no_model_loads


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer_args=("weight_decay=abc",)), "optimizer_args for AdamW: .* \\(given: weight_decay='abc'\\)"),
    (dict(device="cuda"), "device cuda: this PyTorch sees no CUDA GPU"),
    (dict(device="tpu9"), "device 'tpu9': not a device name"),
])
def test_bad_settings_fail_before_any_model_loads(ws, tokenizer_dirs, tmp_path, no_model_loads, overrides, message):
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ConfigError, match=message):
        train(config(ws, tokenizer_dirs, tmp_path, **overrides), SilentReporter())
    assert not no_model_loads


def test_disk_caches_are_counted_against_the_free_space(ws, tokenizer_dirs, tmp_path, monkeypatch, no_model_loads):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 2**20))  # 1 MiB
    disk = dict(cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"cache_dir .*/c: 1 MiB free, but the disk caches need about 2\.1 MiB$"):
        train(config(ws, tokenizer_dirs, tmp_path / "out", **disk), SilentReporter())
    assert not no_model_loads
