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
sections = pack("trainer.config.sections")

FREE = 11.6 * GIB  # FLUX.1-dev needs fp8 and swapped blocks here, so every rule-out changes the plan
MODELS = t.ModelFiles(sections.ModelsConfig(pretrained_model_name_or_path="/m/flux.safetensors",
                                            clip_l="/m/clip_l.safetensors", t5xxl="/m/t5.safetensors",
                                            ae="/m/ae.safetensors"))
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
    return cli.config_from_args(cli.parse_command_line(args), lambda text: None, measure=cli.measure_machine)


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
    assert memory_fields(node) == memory_fields(cli)


def memory_fields(config) -> dict:
    flags = config.flags()
    return {name: flags[name] for name in MEMORY_FIELDS}


def test_memory_auto_leaves_out_what_the_extra_options_rule_out(images, tmp_path):
    assert not node_config(images, tmp_path, "--mixed_precision no").memory.fp8_base
    base = node_config(images, tmp_path, "--base_weights base.safetensors").memory
    assert not base.fp8_base and base.blocks_to_swap  # bf16 with more blocks swapped instead
    offload = node_config(images, tmp_path, "--gradient_checkpointing --cpu_offload_checkpointing").memory
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

    roomy = cli_config(images, tmp_path, monkeypatch, "").memory
    assert roomy.blocks_to_swap  # 11.6 GiB needs swapped blocks
    tight = pinned_host_bytes(roomy.blocks_to_swap, roomy.fp8_base, FLUX_DEV) - 1
    lean = cli_config(images, tmp_path, monkeypatch, "", host=tight).memory
    assert not lean.blocks_to_swap or pinned_host_bytes(lean.blocks_to_swap, lean.fp8_base, FLUX_DEV) <= tight


def test_the_train_nodes_auto_keeps_block_swap_within_the_hosts_free_memory(images, tmp_path):
    from trainer.config.memory_plan import FLUX_DEV, pinned_host_bytes

    dataset = t.dataset_config(images.name, images.parent, 64, caption_extension=".caption")

    def planned(free_host):
        return t.train_config(models=MODELS, datasets=(dataset,), flow=FLOW, max_train_steps=4,
                              memory=t.memory_fields(mode="auto", gradient_checkpointing=True), free_memory=FREE,
                              free_host=free_host, output_dir=tmp_path / "out", output_name="lora",
                              cache_dir=tmp_path / "cache").config.memory

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
        assert config.memory.torch_compile and not config.memory.blocks_to_swap


# ------------------------------------------------------------------------------------------ every option

cli_module = pack("trainer.cli")
flow_module = pack("trainer.config.flow")
optim = pack("trainer.config.optim")
FLAG_SECTIONS = pack("trainer.config.train").FLAG_SECTIONS
FLOW_FIELDS = pack("trainer.config.combine").FLOW_FIELDS
EVERY_OPTION = sorted({*FLAG_SECTIONS, *FLOW_FIELDS, *cli_module.LORA_FLAGS} - set(cli_module.NOT_FLAGS))
# options whose values are checked by their section, not by the parser: their choices
CHOICES = {"mixed_precision": sections.MIXED_PRECISION, "save_precision": sections.SAVE_PRECISION,
           "log_with": sections.LOG_WITH, "lr_scheduler": optim.SCHEDULERS,
           "timestep_sampling": flow_module.TIMESTEP_SAMPLINGS, "model_prediction_type": flow_module.PREDICTION_TYPES,
           "weighting_scheme": flow_module.WEIGHTING_SCHEMES, "loss_type": flow_module.LOSS_TYPES,
           "huber_schedule": flow_module.HUBER_SCHEDULES}
# the few that need a particular value, or other options beside them to be valid (on both front ends alike)
SPECIAL = {
    "optimizer_type": (["AdamW8bit"], []), "optimizer_args": (["weight_decay=0.01"], []),
    "lr_scheduler": (["cosine"], []), "lr_scheduler_type": (["CosineAnnealingLR"], ["--lr_scheduler_args", "T_max=9"]),
    "lr_scheduler_args": (["T_max=9"], []), "text_encoder_lr": (["1e-5", "2e-5"], []),
    "base_weights": (["base.safetensors"], []),
    "base_weights_multiplier": (["0.5"], ["--base_weights", "base.safetensors"]),
    "fp8_base": ([], ["--mixed_precision", "bf16"]), "fp8_base_unet": ([], ["--mixed_precision", "bf16"]),
    "full_bf16": ([], ["--mixed_precision", "bf16"]), "full_fp16": ([], ["--mixed_precision", "fp16"]),
    "cpu_offload_checkpointing": ([], ["--gradient_checkpointing"]), "resolution": (["32"], []),
}
# what the nodes set themselves, so the train node's extra options refuse it: the model files and the model type
# (read from the transformer file), the network, and the files and folders that stay inside ComfyUI's
OWNED_BY_THE_NODES = {"pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "clip_l_tokenizer", "t5xxl_tokenizer",
                      "model_type", "network_dim", "network_alpha", "network_dropout", "network_train_unet_only",
                      "network_weights", "dim_from_weights", "output_dir", "output_name", "logging_dir", "cache_dir",
                      "resume", "sample_prompts", "device"}
# values the node cannot express differently from the command line, and why (still compared, or both refused)
SAME_ERROR = {"save_model_as": (["ckpt"], "only safetensors is written: its one valid value is the default")}
ON_BY_DEFAULT_ON_THE_NODE = {  # a store_true flag cannot turn these off on either front end
    "gradient_checkpointing": "recommended for the nodes", "cache_latents": "the nodes cache in memory",
    "cache_text_encoder_outputs": "the nodes cache in memory", "sample_at_end": "previews of the finished LoRA"}


def option_words(name: str) -> list[str]:
    """`--name value...`: a valid value that differs from the CLI's default and the nodes' recommended one."""
    if name in SPECIAL:
        values, companions = SPECIAL[name]
        return [f"--{name}", *values, *companions]
    action = next(a for a in cli_module.build_parser()._actions if a.dest == name)
    if action.nargs == 0:
        return [f"--{name}"]
    defaults = {cli_module.build_parser().get_default(name), t.recommended().flags().get(name),
                getattr(t.recommended().flow, name, None), getattr(flow_module.FlowConfig(), name, None)}
    choices = action.choices or CHOICES.get(name)
    if choices:
        return [f"--{name}", next(c for c in choices if c not in defaults)]
    kind = getattr(action.type, "__name__", "str")
    return [f"--{name}", {"int": "3", "float": "0.25", "_int_or_float": "0.25"}.get(kind, "x")]


def command_line(images, tmp_path, words: list[str]):
    args = ["--pretrained_model_name_or_path", "/m/flux.safetensors", "--clip_l", "/m/clip_l.safetensors",
            "--t5xxl", "/m/t5.safetensors", "--ae", "/m/ae.safetensors", "--train_data_dir", str(images),
            "--resolution", "64", "--output_dir", str(tmp_path / "cli"), *words]
    return cli_module.config_from_args(cli_module.parse_command_line(args), lambda text: None)


def train_node(images, tmp_path, words: list[str]):
    dataset = t.dataset_config(images.name, images.parent, 64, caption_extension=".caption")
    return t.train_config(models=MODELS, datasets=(dataset,), flow=FLOW, max_train_steps=4,
                          extra_options=" ".join(words), output_dir=tmp_path / "out", output_name="lora",
                          cache_dir=tmp_path / "cache").config


def both_front_ends(images, tmp_path, words: list[str]):
    return command_line(images, tmp_path, words), train_node(images, tmp_path, words)


def resolved_value(config, name: str):
    if name in FLOW_FIELDS:
        return config.flow, getattr(config.flow, name)
    section = getattr(config, FLAG_SECTIONS[name])
    return section, getattr(section, name)


@pytest.mark.parametrize("name", EVERY_OPTION)
def test_every_option_resolves_the_same_on_the_command_line_and_the_train_node(images, tmp_path, name):
    words = option_words(name)
    if FLAG_SECTIONS.get(name) == "data":
        with pytest.raises(ConfigError, match=f"extra_options: --{name} is a dataset option"):
            train_node(images, tmp_path, words)
        return
    if name in OWNED_BY_THE_NODES:
        with pytest.raises(ConfigError, match=f"extra_options: --{name} is set by the .* node"):
            train_node(images, tmp_path, words)
        return
    if name in SAME_ERROR:
        value, why = SAME_ERROR[name]
        with pytest.raises(ConfigError) as cli_error:
            command_line(images, tmp_path, [f"--{name}", *value])
        with pytest.raises(ConfigError) as node_error:
            train_node(images, tmp_path, [f"--{name}", *value])
        assert str(node_error.value) == str(cli_error.value), why
        return
    cli, node = both_front_ends(images, tmp_path, words)
    (cli_section, cli_value), (node_section, node_value) = resolved_value(cli, name), resolved_value(node, name)
    assert type(cli_section) is type(node_section) and cli_value == node_value
    if name not in ON_BY_DEFAULT_ON_THE_NODE:  # the option changed something on both front ends
        plain_cli, plain_node = both_front_ends(images, tmp_path, [])
        assert resolved_value(plain_cli, name)[1] != cli_value or resolved_value(plain_node, name)[1] != node_value


def test_the_options_the_node_owns_are_options():
    """The node's refusal table is exactly what the nodes set, and names real options only."""
    assert set(t.NODE_OWNED) == OWNED_BY_THE_NODES | {"network_args", "network_module"}
    assert OWNED_BY_THE_NODES <= set(EVERY_OPTION)
    assert set(ON_BY_DEFAULT_ON_THE_NODE) | set(SAME_ERROR) | set(SPECIAL) <= set(EVERY_OPTION)
