"""The two front ends resolve the same options the same way: `--memory auto` with options that rule something out,
and dataset options typed into the train node's extra options (refused there: they would reach no dataset)."""

import pytest
from packimport import pack  # noqa: F401
from PIL import Image

from trainer.config.memory_plan import GIB
from trainer.models.flux import FluxParams

t = pack("nodes.translate")
ConfigError = pack("trainer.errors").ConfigError
resolve = pack("trainer.config.resolve")

FREE = 11.6 * GIB  # FLUX.1-dev needs fp8 and swapped blocks here, so every rule-out changes the plan
MODELS = {"pretrained_model_name_or_path": "/m/flux.safetensors", "clip_l": "/m/clip_l.safetensors",
          "t5xxl": "/m/t5.safetensors", "ae": "/m/ae.safetensors", "fp8_base": False, "t5xxl_fp8": False}
FLOW = {"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
        "model_prediction_type": "raw", "guidance_scale": 1.0, "loss_type": "l2"}
MEMORY_FIELDS = ("fp8_base", "blocks_to_swap", "cpu_offload_checkpointing", "gradient_checkpointing",
                 "mixed_precision", "t5xxl_fp8", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
                 "cache_text_encoder_outputs_to_disk")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "input" / "faces"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"photo {i}")
    return folder


def node_config(images, tmp_path, extra: str):
    dataset = t.dataset_config(images.name, images.parent, 64, caption_extension=".caption")
    return t.train_config(models=MODELS, datasets=(dataset,), flow=FLOW, max_train_steps=4,
                          memory=t.memory_fields(mode="auto", gradient_checkpointing=True), free_memory=FREE,
                          extra_options=extra, output_dir=tmp_path / "out", output_name="lora",
                          cache_dir=tmp_path / "cache").config


def cli_config(images, tmp_path, monkeypatch, extra: str, host: float | None = None):
    from trainer import cli

    monkeypatch.setattr(cli, "free_device_memory", lambda device: ("cuda", FREE))

    monkeypatch.setattr(cli, "free_host_memory", lambda device_type: host)  # not this machine's RAM
    monkeypatch.setattr("trainer.models.read_flux_params", lambda path: FluxParams())
    args = ["--pretrained_model_name_or_path", "/m/flux.safetensors", "--clip_l", "/m/clip_l.safetensors",
            "--t5xxl", "/m/t5.safetensors", "--ae", "/m/ae.safetensors", "--train_data_dir", str(images),
            "--resolution", "64", "--output_dir", str(tmp_path / "cli"), "--memory", "auto", *extra.split()]
    return cli.config_with_memory_plan(cli.parse_command_line(args), lambda text: None)


@pytest.mark.parametrize("extra", [
    "--mixed_precision no",
    "--base_weights base.safetensors",
    "--gradient_checkpointing --cpu_offload_checkpointing",
    "--mixed_precision fp16",
    "--network_args train_t5xxl=True",
    "",
])
def test_memory_auto_resolves_the_same_on_both_front_ends(images, tmp_path, monkeypatch, extra):
    node_extra = extra.replace("--network_args train_t5xxl=True", "")  # the network node sets train_t5xxl
    if node_extra != extra:
        network = t.network_fields(network_dim=4, network_alpha=4, train_t5xxl=True)
        dataset = t.dataset_config(images.name, images.parent, 64, caption_extension=".caption")
        node = t.train_config(models=MODELS, datasets=(dataset,), flow=FLOW, max_train_steps=4, network=network,
                              memory=t.memory_fields(mode="auto", gradient_checkpointing=True), free_memory=FREE,
                              output_dir=tmp_path / "out", output_name="lora", cache_dir=tmp_path / "cache").config
    else:
        node = node_config(images, tmp_path, extra)
    cli = cli_config(images, tmp_path, monkeypatch, extra)
    assert {f: getattr(node, f) for f in MEMORY_FIELDS} == {f: getattr(cli, f) for f in MEMORY_FIELDS}


def test_memory_auto_leaves_out_what_the_extra_options_rule_out(images, tmp_path):
    assert not node_config(images, tmp_path, "--mixed_precision no").fp8_base
    base = node_config(images, tmp_path, "--base_weights base.safetensors")
    assert not base.fp8_base and base.blocks_to_swap  # bf16 with more blocks swapped instead
    offload = node_config(images, tmp_path, "--gradient_checkpointing --cpu_offload_checkpointing")
    assert offload.cpu_offload_checkpointing and not offload.blocks_to_swap


@pytest.mark.parametrize("name", resolve.FALLBACK_OPTIONS + ("dataset_repeats", "face_crop_aug_range"))
def test_dataset_options_in_the_train_nodes_extra_options_are_refused_by_name(images, tmp_path, name):
    from trainer.cli import build_parser

    action = next(a for a in build_parser()._actions if a.dest == name)
    words = [f"--{name}"] if action.nargs == 0 else [f"--{name}", str(action.type("1") if action.type else "1")]
    with pytest.raises(ConfigError, match=f"--{name} is a dataset option: set it on the dataset node"):
        node_config(images, tmp_path, " ".join(words))


def test_memory_auto_keeps_block_swap_within_the_hosts_free_memory(images, tmp_path, monkeypatch):
    """On a GPU the CLI plans with the host's available memory: no swap count that would pin more is picked."""
    from trainer.config.memory_plan import FLUX_DEV, pinned_host_bytes

    roomy = cli_config(images, tmp_path, monkeypatch, "")
    assert roomy.blocks_to_swap  # 11.6 GiB needs swapped blocks
    tight = pinned_host_bytes(roomy.blocks_to_swap, roomy.fp8_base, FLUX_DEV) - 1
    lean = cli_config(images, tmp_path, monkeypatch, "", host=tight)
    assert not lean.blocks_to_swap or pinned_host_bytes(lean.blocks_to_swap, lean.fp8_base, FLUX_DEV) <= tight


def test_the_train_nodes_auto_keeps_block_swap_within_the_hosts_free_memory(images, tmp_path):
    from trainer.config.memory_plan import FLUX_DEV, pinned_host_bytes

    dataset = t.dataset_config(images.name, images.parent, 64, caption_extension=".caption")

    def planned(free_host):
        return t.train_config(models=MODELS, datasets=(dataset,), flow=FLOW, max_train_steps=4,
                              memory=t.memory_fields(mode="auto", gradient_checkpointing=True), free_memory=FREE,
                              free_host=free_host, output_dir=tmp_path / "out", output_name="lora",
                              cache_dir=tmp_path / "cache").config

    roomy = planned(None)
    assert roomy.blocks_to_swap  # 11.6 GiB needs swapped blocks
    tight = pinned_host_bytes(roomy.blocks_to_swap, roomy.fp8_base, FLUX_DEV) - 1
    lean = planned(tight)
    assert not lean.blocks_to_swap or pinned_host_bytes(lean.blocks_to_swap, lean.fp8_base, FLUX_DEV) <= tight


def test_memory_auto_never_swaps_blocks_under_cudagraphs(images, tmp_path, monkeypatch):
    """cudagraphs replays need fixed device addresses, which block swap changes: the plan does not swap then
    (before, the plan's own swap count was refused as if the user had given it)."""
    compiled = "--torch_compile --dynamo_backend cudagraphs"
    for config in (node_config(images, tmp_path, compiled), cli_config(images, tmp_path, monkeypatch, compiled)):
        assert config.torch_compile and not config.blocks_to_swap
