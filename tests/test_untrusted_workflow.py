"""A shared ComfyUI workflow is untrusted input: on the node path only the named optimizers and schedules exist. A
class path (`module.attr`) in the train node's extra_options or the optimizer node is refused before anything is
imported; the command line keeps class paths."""

import sys

import pytest
import torch
from packimport import PACK, REPO, pack  # noqa: F401
from PIL import Image

t = pack("nodes.translate")
errors = pack("trainer.errors")
config_pkg = pack("trainer.config")

PROBE = "probe_workflow_module"
PROBE_SOURCE = """
import pathlib, sys
pathlib.Path(sys.modules[__name__].__file__).with_name("imported.flag").write_text("imported")
import torch


class Opt(torch.optim.SGD):
    pass


class Sched(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer):
        super().__init__(optimizer, lambda step: 1.0)
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A module whose import leaves imported.flag beside it: proof of an import, even a failed one."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{PROBE}.py").write_text(PROBE_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    yield folder / "imported.flag"
    sys.modules.pop(PROBE, None)


def assert_not_imported(flag):
    assert not flag.exists() and PROBE not in sys.modules


@pytest.mark.parametrize("option", ["--optimizer_type", "--lr_scheduler_type"])
def test_extra_options_class_path_is_refused_before_any_import(probe, option):
    path = f"{PROBE}.Opt" if option == "--optimizer_type" else f"{PROBE}.Sched"
    with pytest.raises(errors.ConfigError) as raised:
        t.parse_extra_options(f"{option} {path}")
    message = str(raised.value)
    assert message.startswith(f"extra_options: {option[2:]} '{path}'") and "command-line feature only" in message
    assert_not_imported(probe)


def test_extra_options_bare_non_torch_scheduler_name_is_refused(probe):
    with pytest.raises(errors.ConfigError, match="lr_scheduler_type 'LambdaLR' is not taken here; use "
                                                 "--lr_scheduler"):
        t.parse_extra_options("--lr_scheduler_type LambdaLR")


def test_optimizer_node_class_path_is_refused_before_any_import(probe):
    with pytest.raises(errors.ConfigError, match=f"optimizer node: optimizer_type '{PROBE}.Opt' is not one of the "
                                                 "named optimizers"):
        t.optimizer_fields(optimizer_type=f"{PROBE}.Opt", learning_rate=1e-4, lr_scheduler="constant")
    assert_not_imported(probe)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "input" / "faces"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (40, 80, 120)).save(folder / "0.png")
    (folder / "0.txt").write_text("photo")
    return folder.parent


def test_a_forged_optimizer_piece_is_refused_by_the_train_node(probe, inputs, tmp_path):
    """A workflow JSON can carry any value in the optimizer node's output; the train node checks it too."""
    dataset = t.dataset_config("faces", inputs, 64, caption_extension=".txt")
    flow = {"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
            "model_prediction_type": "raw", "guidance_scale": 1.0, "loss_type": "l2"}
    sections = pack("trainer.config.sections")
    models = t.ModelFiles(sections.ModelsConfig(pretrained_model_name_or_path="/m/f.safetensors",
                                                clip_l="/m/c.safetensors", t5xxl="/m/t.safetensors",
                                                ae="/m/a.safetensors"))
    common = dict(models=models, datasets=(dataset,), flow=flow, max_train_steps=2, output_dir=tmp_path / "out",
                  output_name="lora", cache_dir=None)
    with pytest.raises(errors.ConfigError, match=f"train node: optimizer_type '{PROBE}.Opt' is not one of"):
        t.train_config(**common, optimizer=sections.OptimizerConfig(optimizer_type=f"{PROBE}.Opt"))
    with pytest.raises(errors.ConfigError, match="optimizer: expected the optimizer node's output"):
        t.train_config(**common, optimizer={"optimizer_type": f"{PROBE}.Opt", "learning_rate": 1e-4})
    assert_not_imported(probe)


def test_named_optimizers_and_torch_schedulers_pass_on_the_node_path():
    flags = t.parse_extra_options("--optimizer_type DAdaptAdam --lr_scheduler_type CosineAnnealingLR "
                                  "--lr_scheduler_args T_max=10").flags
    assert flags["optimizer_type"] == "DAdaptAdam" and flags["lr_scheduler_type"] == "CosineAnnealingLR"


def test_the_command_line_keeps_class_paths(probe):
    """The same class paths work from the CLI (a power feature there): the module is imported and used."""
    from trainer.config import TrainConfig
    from trainer.optim import build_optimizer_and_scheduler

    c = TrainConfig.from_flags(pretrained_model_name_or_path="f", clip_l="c", t5xxl="t", ae="a",
                               train_data_dir="images",
                               optimizer_type=f"{PROBE}.Opt", lr_scheduler_type=f"{PROBE}.Sched")
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = build_optimizer_and_scheduler(c, [{"params": [param]}], 10)
    assert type(optimizer).__name__ == "Opt" and type(scheduler).__name__ == "Sched" and probe.exists()


def test_the_network_nodes_catastrophic_pattern_is_refused_before_matching():
    with pytest.raises(errors.LoRAConfigError, match=r"network_reg_dims: pattern '\^\(\\\\w\+\)\+!' is refused"):
        t.network_fields(network_dim=4, network_alpha=4, network_args="network_reg_dims=^(\\w+)+!=4")
