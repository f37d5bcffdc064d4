"""trainer/config/combine.py and extra_options.py: the one place that decides how the options a front end was given
become a TrainConfig, and what it tells the user about options it overrode or left out."""

import pytest
from packimport import pack  # noqa: F401
from PIL import Image

combine_module = pack("trainer.config.combine")
extra = pack("trainer.config.extra_options")
sections = pack("trainer.config.sections")
config_package = pack("trainer.config")
ConfigError = pack("trainer.errors").ConfigError
t = pack("nodes.translate")
Source, combine = combine_module.Source, combine_module.combine

FILES = {"pretrained_model_name_or_path": "/m/flux.safetensors", "clip_l": "/m/clip_l.safetensors",
         "t5xxl": "/m/t5.safetensors", "ae": "/m/ae.safetensors", "train_data_dir": "/data"}
FLOW = {"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
        "model_prediction_type": "raw", "guidance_scale": 1.0, "loss_type": "l2"}


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "input" / "faces"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo {i}")
    return t.dataset_config("faces", folder.parent, 64, caption_extension=".txt")


def node_plan(dataset, tmp_path, **pieces):
    models = t.ModelFiles(sections.ModelsConfig(**{k: v for k, v in FILES.items() if k != "train_data_dir"}))
    return t.train_config(**{"models": models, "datasets": (dataset,), "flow": FLOW, "max_train_steps": 10,
                             "output_dir": tmp_path / "out", "output_name": "lora", "cache_dir": None, **pieces})


def test_a_later_source_wins_and_every_value_it_replaces_is_noted():
    resolved = combine([Source("the command line", {**FILES, "learning_rate": 1e-4, "seed": 3}),
                        Source("extra_options", {"learning_rate": 1e-3, "seed": 3, "max_train_steps": 5})])
    assert resolved.config.optimizer.learning_rate == 1e-3 and resolved.config.run.max_train_steps == 5
    assert resolved.notes == ("--learning_rate 0.001 (extra_options) overrides the command line's 0.0001",)
    with pytest.raises(KeyError, match="bogus is not an option"):
        combine([Source("a front end", {**FILES, "bogus": 1})])


def test_the_train_nodes_extra_options_say_which_node_they_override(dataset, tmp_path):
    optimizer, _ = t.optimizer_fields(optimizer_type="AdamW", learning_rate=1e-4, lr_scheduler="constant")
    memory = t.memory_fields(gradient_checkpointing=True, blocks_to_swap=8)
    plan = node_plan(dataset, tmp_path, optimizer=optimizer, memory=memory, max_train_steps=20,
                     extra_options="--learning_rate 0.001 --blocks_to_swap 12 --max_train_steps 30")
    assert (plan.config.optimizer.learning_rate, plan.config.memory.blocks_to_swap) == (1e-3, 12)
    assert "--learning_rate 0.001 (extra_options) overrides the optimizer node's 0.0001" in plan.notes
    assert "--blocks_to_swap 12 (extra_options) overrides the memory node's 8" in plan.notes
    assert "--max_train_steps 30 (extra_options) overrides the train node's 20" in plan.notes


def test_a_text_encoder_rate_left_to_the_learning_rate_follows_the_final_one(dataset, tmp_path):
    """The network node's "0 = the learning rate" means the rate the run uses, wherever it was set."""
    network = t.network_fields(network_dim=4, network_alpha=4, train_clip_l=True, clip_l_lr=0.0)
    plan = node_plan(dataset, tmp_path, network=network, extra_options="--learning_rate 0.002")
    assert plan.config.optimizer.text_encoder_lr == (0.002, 0.002)
    resolved = combine([Source("the command line", {**FILES, "text_encoder_lr": (None, 5e-5)})])
    assert resolved.config.optimizer.text_encoder_lr == (sections.OptimizerConfig().learning_rate, 5e-5)


def test_default_caches_give_way_but_chosen_ones_keep_the_cores_error():
    network = config_package.LoRAConfig(train_t5xxl=True)
    defaults = {"cache_text_encoder_outputs": True, "mixed_precision": "bf16"}
    resolved = combine([Source("the command line", {**FILES, "network": network})], defaults=defaults)
    assert not resolved.config.caching.cache_text_encoder_outputs
    assert resolved.notes == ("text-encoder outputs are not cached: T5-XXL is trained (its outputs change every "
                              "step)",)
    with pytest.raises(ConfigError, match="train_t5xxl trains T5 itself"):
        combine([Source("the command line", {**FILES, "network": network, "cache_text_encoder_outputs": True})],
                defaults=defaults)


def test_chroma_turns_on_what_it_needs_unless_a_source_set_it():
    chroma = {**FILES, "model_type": "chroma"}
    resolved = combine([Source("the command line", chroma)])
    assert resolved.config.models.apply_t5_attn_mask and resolved.config.flow.guidance_scale == 0.0
    kept = combine([Source("the command line", {**chroma, "guidance_scale": 2.0})])
    assert kept.config.flow.guidance_scale == 2.0


def test_memory_auto_plans_on_the_draft_and_fills_only_what_no_source_set(dataset, tmp_path):
    from trainer.config.memory_plan import FLUX_DEV, GIB

    seen = []

    def measure(draft):
        seen.append(draft.memory.blocks_to_swap)
        return combine_module.Machine(11.6 * GIB, "cuda", None, FLUX_DEV)

    files = {k: v for k, v in FILES.items() if k != "train_data_dir"}
    given = {**files, "datasets": (dataset,), "blocks_to_swap": 30, "mixed_precision": "bf16"}
    resolved = combine([Source("the command line", given)], measure=measure)
    assert seen == [30]  # measured once, on the config the command line describes
    assert resolved.config.memory.blocks_to_swap == 30 and resolved.config.memory.fp8_base
    assert resolved.memory.row == 12 and resolved.notes[0].startswith("auto: 11.6 GiB free")


def test_extra_options_become_a_source_and_what_does_not_apply_is_refused_by_name():
    source = extra.parse_extra_options("--learning_rate 1e-3\n# a comment\n--text_encoder_lr\n"
                                       "--optimizer_args weight_decay=0.01 --base_weights a.safetensors",
                                       refused={}, typed_datasets=True)
    assert source.name == "extra_options"
    assert source.flags == {"learning_rate": 1e-3, "text_encoder_lr": None, "optimizer_args": ("weight_decay=0.01",),
                            "base_weights": ("a.safetensors",)}
    for text, message in (("--flip_aug", "--flip_aug is a dataset option"),
                          ("--output_dir x", "--output_dir is set by the train node, not here"),
                          ("--memory auto", "--memory is not a training option taken here"),
                          ("-x", "-x: write options in full"),
                          ("--seed", "expected one argument")):
        with pytest.raises(ConfigError, match=f"extra_options: .*{message}"):
            extra.parse_extra_options(text, refused={"output_dir": "the train node"}, typed_datasets=True)
    assert extra.parse_extra_options("--flip_aug", refused={}, typed_datasets=False).flags == {"flip_aug": True}
