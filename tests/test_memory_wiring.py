"""Where the memory machinery meets the front ends: block swap's pinned host memory is checked in the pre-flight
(before any model loads), and the CLI's --memory auto lets an out-of-memory run step down."""

import pytest
import torch

from trainer import cli
from trainer.config import ConfigError, memory_plan
from trainer.events import Finished
from trainer.models import read_flux_params
from trainer.preflight import check

from trainspace import cli_args, config, make_workspace


@pytest.fixture
def ws(tmp_path):
    return make_workspace(tmp_path / "ws")


def test_a_swap_count_the_host_cannot_pin_is_refused_in_the_preflight(ws, tokenizer_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run: block swap would pin
    swapped = config(ws, tokenizer_dirs, tmp_path / "out", device=None, blocks_to_swap=3)
    size = memory_plan.TransformerSize.of(read_flux_params(swapped.models.pretrained_model_name_or_path))
    pinned = memory_plan.pinned_host_bytes(3, False, size)
    monkeypatch.setattr(memory_plan, "available_host_bytes", lambda: pinned - 1)
    with pytest.raises(ConfigError, match="blocks_to_swap 3: block swap pins"):
        check(swapped)
    monkeypatch.setattr(memory_plan, "available_host_bytes", lambda: pinned)
    check(swapped)


def test_memory_auto_on_the_command_line_steps_down_on_out_of_memory(ws, tokenizer_dirs, tmp_path, monkeypatch):
    calls = []

    def fake_train(config, reporter, **options):
        calls.append(options)
        return Finished(lora=None, steps=1, stopped_early=False, losses=(0.5,))

    monkeypatch.setattr("trainer.loop.train", fake_train)
    args = cli_args(ws, tokenizer_dirs, tmp_path / "out") + ["--max_train_steps", "1"]
    assert cli.main(args) == 0 and cli.main(args + ["--memory", "auto"]) == 0
    assert calls == [{"step_down": False}, {"step_down": True}]


def test_no_half_vae_keeps_the_autoencoder_in_float32(ws, tokenizer_dirs, tmp_path):
    """sd-scripts runs the autoencoder in bf16 under --mixed_precision bf16 unless --no_half_vae; so do we (on a
    GPU: the CPU always encodes in float32)."""
    from trainer.session import autoencoder_dtype

    assert autoencoder_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert autoencoder_dtype(torch.bfloat16, "cuda", no_half_vae=True) == torch.float32
    assert autoencoder_dtype(torch.bfloat16, "cpu") == autoencoder_dtype(torch.float16, "cuda") == torch.float32
    ns = cli.parse_command_line(cli_args(ws, tokenizer_dirs, tmp_path / "out") + ["--no_half_vae"])
    assert cli.config_from_args(ns).memory.no_half_vae
