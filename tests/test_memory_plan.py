"""The memory plan's estimate against the reference measurements (sd-scripts, FLUX.1-dev architecture, LoRA rank 16
on every block Linear, AdamW, batch 1, one H200; DESIGN.md), its parameter count against the model itself, and the
CLI's --memory auto."""

from types import SimpleNamespace

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
    monkeypatch.setattr(cli, "free_host_memory", lambda device_type: None)  # not this machine's RAM
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())  # as if FLUX.1-dev
    ns = cli.parse_command_line(cli_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto", "--mixed_precision",
                                                                          "bf16", "--blocks_to_swap", "30"])
    messages = []
    config = planned(cli, ns, messages)
    assert config.memory.fp8_base and config.memory.gradient_checkpointing and config.memory.t5xxl_fp8
    assert config.caching.cache_latents
    assert config.memory.blocks_to_swap == 30  # given on the command line: kept
    monkeypatch.undo()
    monkeypatch.setattr(cli, "free_device_memory", lambda device: ("cuda", 9.6 * GIB))
    monkeypatch.setattr(cli, "free_host_memory", lambda device_type: None)  # not this machine's RAM
    tiny = planned(cli, cli.parse_command_line(
        cli_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto", "--mixed_precision", "bf16"]), messages)
    assert not tiny.memory.fp8_base and not tiny.memory.blocks_to_swap  # the tiny transformer fits in bf16
    assert "auto: 9.6 GiB free; at 64x64, batch 2" in messages[0]
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())
    ns = cli.parse_command_line(cli_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto"])
    assert planned(cli, ns, messages).memory.mixed_precision == "bf16"  # fp8 base computes in bf16


def planned(cli, ns, messages: list):
    """--memory auto as main() runs it: one config, planned on the machine the draft would train on."""
    return cli.config_from_args(ns, messages.append, measure=cli.measure_machine, inform=messages.append)


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
    monkeypatch.setattr(cli, "free_host_memory", lambda device_type: None)  # not this machine's RAM
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())
    args = cli_args(ws, tokenizer_dirs, tmp_path)
    args[args.index("--dataset_config"):args.index("--dataset_config") + 2] = [
        "--train_data_dir", str(ws["root"] / "dataset"), "--resolution", "64"]
    messages = []
    config = planned(cli, cli.parse_command_line(args + ["--memory", "auto"] + extra), messages)
    assert check(SimpleNamespace(**config.flags())), messages


def test_estimate_follows_the_slots_cap_of_block_swap():
    """The estimate frees what trainer/block_swap.py really streams (less its slots), capped like it at the top."""
    from trainer.block_swap import swap_plan
    from trainer.config.memory_plan import SWAP_SLOTS, swapped_blocks

    for n in range(36):
        plan = swap_plan(n, 19, 38, SWAP_SLOTS)
        resident_slots = (min(SWAP_SLOTS, plan.double), min(SWAP_SLOTS, plan.single))
        assert swapped_blocks(n, FLUX_DEV) == (plan.double - resident_slots[0], plan.single - resident_slots[1]), n


# ------------------------------------------------------------------------------------------ host RAM, out of memory

def test_block_swap_pins_what_the_issue_measures_and_the_plan_says_so():
    from trainer.config.memory_plan import GIB, pinned_host_bytes, plan_memory

    assert pinned_host_bytes(35) / 1e9 == pytest.approx(22.7, abs=0.05)
    assert pinned_host_bytes(35, fp8=True) / 1e9 == pytest.approx(11.4, abs=0.05)
    assert pinned_host_bytes(0) == pinned_host_bytes(None) == 0
    plan = plan_memory(8 * GIB, "cuda", host_free_bytes=64 * GIB)
    swap = plan.fields["blocks_to_swap"]
    assert swap and f"block swap pins {pinned_host_bytes(swap, True) / GIB:.1f} GiB of host memory (64.0 GiB " \
                   "available)" in plan.text()


def test_the_plan_never_pins_more_host_memory_than_is_free():
    from trainer.config.memory_plan import GIB, pinned_host_bytes, plan_memory

    unlimited = plan_memory(8 * GIB, "cuda")
    host = pinned_host_bytes(unlimited.fields["blocks_to_swap"], True) - 1  # one byte short of that plan's swap
    plan = plan_memory(8 * GIB, "cuda", host_free_bytes=host)
    assert plan.fields["blocks_to_swap"] < unlimited.fields["blocks_to_swap"]
    assert pinned_host_bytes(plan.fields["blocks_to_swap"], plan.fields["fp8_base"]) <= host


def test_available_host_bytes_reads_memavailable(tmp_path):
    from trainer.config.memory_plan import available_host_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12345678 kB\n")
    assert available_host_bytes(str(meminfo)) == 12345678 * 1024
    assert available_host_bytes(str(tmp_path / "absent")) is None


def test_a_swap_count_whose_pinned_memory_does_not_fit_is_refused_naming_the_numbers():
    from trainer.config.memory_plan import GIB, check_pinned_host_memory, pinned_host_bytes
    from trainer.errors import ConfigError

    available = 16 * GIB
    with pytest.raises(ConfigError, match=r"blocks_to_swap 35: block swap pins 21\.2 GiB of host memory .* and "
                                          r"16\.0 GiB is available \(MemAvailable\): --blocks_to_swap (\d+) fits, "
                                          r"--fp8_base halves it"):
        check_pinned_host_memory(35, False, FLUX_DEV, "cuda", available)
    check_pinned_host_memory(35, True, FLUX_DEV, "cuda", available)  # 10.6 GiB in fp8: fits
    check_pinned_host_memory(35, False, FLUX_DEV, "cpu", 1)  # nothing is pinned on the CPU
    try:
        check_pinned_host_memory(35, False, FLUX_DEV, "cuda", available)
    except ConfigError as e:
        fitting = int(str(e).split("--blocks_to_swap ")[1].split()[0])
    assert pinned_host_bytes(fitting) <= available < pinned_host_bytes(fitting + 1)


def test_step_down_swaps_more_blocks_then_turns_on_fp8():
    from trainer.config.memory_plan import GIB, pinned_host_bytes, step_down

    ladder, swap, fp8 = [], None, False
    while (change := step_down(swap, fp8)) is not None:
        fields, text = change
        ladder.append(text)
        swap, fp8 = fields.get("blocks_to_swap", swap), fields.get("fp8_base", fp8)
    assert ladder == ["--blocks_to_swap 8 (was 0)", "--blocks_to_swap 16 (was 8)", "--blocks_to_swap 22 (was 16)",
                      "--blocks_to_swap 28 (was 22)", "--blocks_to_swap 35 (was 28)",
                      "--fp8_base (the transformer's weights in fp8)"]
    assert step_down(None, False, allow_swap=False)[0] == {"fp8_base": True}
    assert step_down(8, True, allow_fp8=False)[0] == {"blocks_to_swap": 16}
    assert step_down(35, False, allow_fp8=False) is None
    room = pinned_host_bytes(16) + GIB // 2  # 22 blocks would not fit the host
    assert step_down(16, False, host_free_bytes=room)[0] == {"fp8_base": True}


def test_after_out_of_memory_the_plan_names_the_next_settings():
    from trainer.config.memory_plan import GIB, estimate_peak_gib, leaner_options

    text = leaner_options(15.6 * GIB, 0, False)
    swap = int(text.split("--blocks_to_swap ")[1].split(",")[0])
    assert text == f"at 1024² on 15.6 GiB free: --blocks_to_swap {swap}, or --fp8_base"
    assert estimate_peak_gib(FLUX_DEV, False, swap) <= 15.6 - 0.8 < estimate_peak_gib(FLUX_DEV, False, swap - 1)
    assert leaner_options(None, 0, False) == "at 1024²: --blocks_to_swap 8, or --fp8_base"
    assert leaner_options(None, 8, True, resolution=(768, 512), batch_size=2) == \
        "at 768x512, batch 2: --blocks_to_swap 16"
    assert "--fp8_base with --blocks_to_swap" in leaner_options(9 * GIB, 0, False)
    assert "a lower resolution or batch size" in leaner_options(4 * GIB, 35, True)
