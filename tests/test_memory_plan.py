"""The memory plan's estimate against the reference measurements (sd-scripts, FLUX.1-dev architecture, LoRA rank 16
on every block Linear, AdamW, batch 1, one H200; DESIGN.md), its parameter count against the model itself, and the
CLI's --memory auto."""

import pytest
import torch

from trainer.config.memory_plan import FLUX_DEV, TransformerSize, estimate_peak_gib
from trainer.models.flux import Flux, FluxParams
from trainer.models.tiny import TINY_FLUX

# (fp8 base, blocks swapped, resolution, measured peak GiB)
REFERENCE = [(False, 0, 1024, 25.6), (False, 0, 512, 24.0), (True, 0, 1024, 14.6), (True, 0, 512, 13.1),
             (False, 18, 1024, 15.1), (True, 18, 1024, 9.4)]


@pytest.mark.parametrize("params", [FluxParams(), FluxParams(guidance_embed=False), TINY_FLUX])
def test_parameter_count_is_the_models(params):
    with torch.device("meta"):
        model = Flux(params)
    size = TransformerSize.of(params)
    assert size.total == sum(p.numel() for p in model.parameters())
    assert size.double_block == sum(p.numel() for p in model.double_blocks[0].parameters())
    assert size.single_block == sum(p.numel() for p in model.single_blocks[0].parameters())
    if params == FluxParams():
        assert size == FLUX_DEV


@pytest.mark.parametrize("fp8, swap, side, measured", REFERENCE)
def test_estimate_is_within_3_percent_of_the_reference(fp8, swap, side, measured):
    estimate = estimate_peak_gib(FLUX_DEV, fp8, swap, (side, side), 1)
    assert abs(estimate - measured) / measured < 0.03, (estimate, measured)


def test_the_guides_8_gb_row_fits_in_8_gib():
    """Issue 12's target, as estimated (measured when a GPU runs bench/memory.py): swap 28 + fp8, 1024², rank 16."""
    assert estimate_peak_gib(FLUX_DEV, fp8=True, blocks_to_swap=28) <= 8.0


def test_cli_memory_auto_fills_what_the_command_line_leaves_open(tmp_path, tokenizer_dirs, capsys, monkeypatch):
    from trainer import cli
    from trainer.config.memory_plan import GIB

    from trainspace import cli_args, make_workspace

    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setattr(cli, "free_device_memory", lambda device: ("cuda", 9.6 * GIB))
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())  # as if FLUX.1-dev
    ns = cli.parse_command_line(cli_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto", "--mixed_precision",
                                                                          "bf16", "--blocks_to_swap", "30"])
    messages = []
    config = cli.config_with_memory_plan(ns, messages.append)
    assert config.fp8_base and config.gradient_checkpointing and config.t5xxl_fp8 and config.cache_latents
    assert config.blocks_to_swap == 30  # given on the command line: kept
    monkeypatch.undo()
    monkeypatch.setattr(cli, "free_device_memory", lambda device: ("cuda", 9.6 * GIB))
    tiny = cli.config_with_memory_plan(cli.parse_command_line(
        cli_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto", "--mixed_precision", "bf16"]), messages.append)
    assert not tiny.fp8_base and not tiny.blocks_to_swap  # the tiny transformer of the files fits in bf16
    assert "auto: 9.6 GiB free; at 64x64, batch 2" in messages[0]
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())
    ns = cli.parse_command_line(cli_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto"])
    assert cli.config_with_memory_plan(ns, messages.append).mixed_precision == "bf16"  # fp8 base computes in bf16


@pytest.mark.parametrize("extra,check", [
    (["--shuffle_caption"], lambda c: not c.cache_text_encoder_outputs and c.cache_latents),
    (["--random_crop"], lambda c: not c.cache_latents and c.cache_text_encoder_outputs),
    (["--network_args", "train_t5xxl=True"], lambda c: not c.cache_text_encoder_outputs),
    (["--base_weights", "x.safetensors"], lambda c: not c.fp8_base and c.blocks_to_swap),  # bf16 + swap instead
    (["--mixed_precision", "no"], lambda c: not c.fp8_base),
    (["--gradient_checkpointing", "--cpu_offload_checkpointing"], lambda c: not c.blocks_to_swap),
    (["--split_mode"], lambda c: c.blocks_to_swap == 18),
])
def test_cli_memory_auto_respects_what_the_other_options_rule_out(tmp_path, tokenizer_dirs, monkeypatch, extra, check):
    from trainer import cli
    from trainer.config.memory_plan import GIB

    from trainspace import cli_args, make_workspace

    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setattr(cli, "free_device_memory", lambda device: ("cuda", 11.6 * GIB))
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())
    args = cli_args(ws, tokenizer_dirs, tmp_path)
    args[args.index("--dataset_config"):args.index("--dataset_config") + 2] = [
        "--train_data_dir", str(ws["root"] / "dataset"), "--resolution", "64"]
    messages = []
    config = cli.config_with_memory_plan(cli.parse_command_line(args + ["--memory", "auto"] + extra),
                                         messages.append)
    assert check(config), messages


def test_estimate_follows_the_slots_cap_of_block_swap():
    """The estimate frees what trainer/block_swap.py really streams (less its slots), capped like it at the top."""
    from trainer.block_swap import swap_plan
    from trainer.config.memory_plan import SWAP_SLOTS, swapped_blocks

    for n in range(36):
        plan = swap_plan(n, 19, 38, SWAP_SLOTS)
        resident_slots = (min(SWAP_SLOTS, plan.double), min(SWAP_SLOTS, plan.single))
        assert swapped_blocks(n, FLUX_DEV) == (plan.double - resident_slots[0], plan.single - resident_slots[1]), n
