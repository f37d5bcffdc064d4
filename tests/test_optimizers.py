"""Optimizers and learning-rate schedules as sd-scripts makes them from its options: bitsandbytes' 8-bit and paged
optimizers (they step on CPU tensors with bitsandbytes 0.50), Adafactor's recipe and its relative-step mode,
schedule-free optimizers, and each schedule against its closed form."""

import copy
import math
import sys
import types

import pytest
import torch

from trainer.checkpoint import Position, capture_rng, load_state, save_state
from trainer.config import OPTIMIZERS, SCHEDULERS, TrainConfig
from trainer.errors import ConfigError
from trainer.optim import build_optimizer_and_scheduler, lr_lambda, optimizer_eval_mode, optimizer_train_mode

# the tests step schedules without an optimizer step, to read each step's factor
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")

FILES = dict(pretrained_model_name_or_path="flux.safetensors", clip_l="clip_l.safetensors", t5xxl="t5.safetensors",
             ae="ae.safetensors", train_data_dir="images")


def config(**overrides) -> TrainConfig:
    return TrainConfig.from_flags(**{**FILES, **overrides})


def target() -> torch.Tensor:
    return torch.linspace(-1, 1, 4096).reshape(64, 64)


def build(param, total=20, lr=1e-2, groups=None, **overrides):
    notes = []
    groups = groups if groups is not None else [{"params": [param], "lr": lr}]
    optimizer, scheduler = build_optimizer_and_scheduler(config(learning_rate=lr, **overrides), groups, total,
                                                         notes.append)
    return optimizer, scheduler, notes


def train(optimizer, scheduler, param, steps: int) -> list[float]:
    """`steps` steps on the quadratic |param - target|^2; the losses before each."""
    losses = []
    for _ in range(steps):
        loss = ((param - target()) ** 2).sum()
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return losses


# ---------------------------------------------------------------------------------------------------- bitsandbytes

EIGHT_BIT = {"AdamW8bit": "AdamW8bit", "PagedAdamW8bit": "PagedAdamW8bit", "Lion8bit": "Lion8bit",
             "PagedLion8bit": "PagedLion8bit", "SGDNesterov8bit": "SGD8bit"}
FULL = {"PagedAdamW": "PagedAdamW", "PagedAdamW32bit": "PagedAdamW32bit"}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", [*EIGHT_BIT, *FULL])
def test_bitsandbytes_optimizers_train_on_cpu(name):
    """bitsandbytes 0.50 steps on CPU tensors (paged ones fall back to unpaged there); the 8-bit ones keep their
    moments in uint8 (tensors of 4096 elements and more) and every one brings a quadratic loss down."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(64, 64))
    lr = 0.05 if "SGD" in name else 1e-2
    optimizer, scheduler, notes = build(param, lr=lr, optimizer_type=name.lower())
    assert type(optimizer) is getattr(bnb.optim, {**EIGHT_BIT, **FULL}[name])
    losses = train(optimizer, scheduler, param, 30)
    assert losses[-1] < 0.7 * losses[0], losses
    state = optimizer.state[param]
    expected = torch.uint8 if name in EIGHT_BIT else torch.float32
    assert state["state1"].dtype == expected
    if name == "SGDNesterov8bit":  # momentum 0.9 as sd-scripts sets it; bitsandbytes takes nesterov and ignores it
        assert optimizer.param_groups[0]["betas"] == (0.9, 0)
        assert any("plain momentum" in n for n in notes)
    assert name in OPTIMIZERS and OPTIMIZERS[name] == "bitsandbytes"


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "SGDNesterov8bit", "PagedAdamW32bit"])
def test_bitsandbytes_state_survives_a_state_folder(tmp_path, name):
    """Save after 5 steps into a state folder (safetensors + JSON, as --save_state writes it), load into a fresh
    optimizer over a copy of the weights: the next 3 steps are the uninterrupted run's, bit for bit."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    optimizer, scheduler, _ = build(param, optimizer_type=name, lr_scheduler="cosine", lr_warmup_steps=2)
    train(optimizer, scheduler, param, 5)
    parts = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **capture_rng(), "losses": []}
    lora = {"w.lora_down.weight": param.detach().clone(), "w.lora_up.weight": torch.zeros(64, 64),
            "w.alpha": torch.tensor(64.0)}
    save_state(tmp_path / "state", lora, parts, Position(5, 0, 5))

    network, loaded, _ = load_state(tmp_path / "state")
    copy = torch.nn.Parameter(network["w.lora_down.weight"].clone())
    resumed, resumed_scheduler, _ = build(copy, optimizer_type=name, lr_scheduler="cosine", lr_warmup_steps=2)
    resumed.load_state_dict(loaded["optimizer"])
    resumed_scheduler.load_state_dict(loaded["scheduler"])
    assert torch.equal(copy, param)
    train(optimizer, scheduler, param, 3)
    train(resumed, resumed_scheduler, copy, 3)
    assert torch.equal(copy, param)
    assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_bitsandbytes_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    param = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match="PagedAdamW32bit needs bitsandbytes: pip install bitsandbytes"):
        build(param, optimizer_type="PagedAdamW32bit")


# ---------------------------------------------------------------------------------------------------- Adafactor


def test_adafactor_recipe_trains_with_constant_with_warmup():
    """The guide's recipe: a fixed lr, no relative step or parameter scaling, constant_with_warmup, clipping off."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(64, 64))
    optimizer, scheduler, notes = build(param, lr=1e-2, optimizer_type="Adafactor", lr_scheduler="constant_with_warmup",
                                        lr_warmup_steps=3, max_grad_norm=0.0,
                                        optimizer_args=("relative_step=False", "scale_parameter=False",
                                                        "warmup_init=False"))
    assert type(optimizer).__name__ == "Adafactor" and notes == []
    assert [optimizer.param_groups[0]["lr"]] == [0.0]  # the warmup starts at 0
    losses = train(optimizer, scheduler, param, 40)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_adafactor_relative_step_switches_the_schedule_like_sd_scripts():
    """Adafactor's default relative_step with another lr_scheduler: sd-scripts switches to the adafactor schedule
    (learning_rate its initial value) and says so; this used to crash on a None learning rate."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(64, 64))
    groups = [{"params": [param], "lr": 1e-3}]
    optimizer, scheduler, notes = build(param, lr=1e-3, groups=groups, optimizer_type="Adafactor",
                                        lr_scheduler="cosine", unet_lr=1e-3)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert optimizer.param_groups[0]["relative_step"] and optimizer.defaults["lr"] is None
    assert scheduler.get_last_lr() == [1e-3]  # lr is the initial value it reports
    text = "\n".join(notes)
    assert "lr_scheduler cosine is replaced by adafactor" in text
    assert "learning_rate 0.001 is only the initial value" in text
    assert "unet_lr and text_encoder_lr are ignored" in text
    losses = train(optimizer, scheduler, param, 20)
    assert losses[-1] < losses[0]
    group = optimizer.param_groups[0]  # from now on it reports the optimizer's own step size
    assert scheduler.get_last_lr()[0] == optimizer._get_lr(group, optimizer.state[param]) != 1e-3


def test_adafactor_warmup_init_turns_relative_step_on():
    param = torch.nn.Parameter(torch.zeros(8, 8))
    optimizer, scheduler, notes = build(param, optimizer_type="Adafactor", lr_scheduler="constant",
                                        optimizer_args=("relative_step=False", "warmup_init=True"))
    assert optimizer.param_groups[0]["relative_step"] and optimizer.param_groups[0]["warmup_init"]
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert any("warmup_init=True needs relative_step" in n for n in notes)


def test_adafactor_schedule_without_relative_step_is_refused():
    with pytest.raises(ConfigError, match="relative_step=False turns off: use constant_with_warmup"):
        config(optimizer_type="Adafactor", lr_scheduler="adafactor", optimizer_args=("relative_step=False",))


# ---------------------------------------------------------------------------------------------------- schedule-free


class _FakeScheduleFree(torch.optim.SGD):
    """Stands in for schedulefree's optimizers: a mode switched by train()/eval()."""

    def __init__(self, params, lr, warmup_steps=0):
        super().__init__(params, lr=lr)
        self.mode = None
        self.warmup_steps = warmup_steps

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"


@pytest.fixture
def fake_schedulefree(monkeypatch):
    module = types.ModuleType("schedulefree")
    for name in ("RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree"):
        setattr(module, name, type(name, (_FakeScheduleFree,), {}))
    monkeypatch.setitem(sys.modules, "schedulefree", module)
    return module


@pytest.mark.parametrize("name", ["RAdamScheduleFree", "adamwschedulefree", "SGDScheduleFree"])
def test_schedule_free_optimizers_by_sd_scripts_names(fake_schedulefree, name):
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer, scheduler, notes = build(param, optimizer_type=name, lr_scheduler="cosine", lr_warmup_steps=5,
                                        optimizer_args=("warmup_steps=7",))
    assert type(optimizer).__name__.lower() == name.lower() and optimizer.warmup_steps == 7
    assert optimizer.mode == "train"  # made ready for training steps, as sd-scripts does
    optimizer_eval_mode(optimizer)
    assert optimizer.mode == "eval"
    optimizer_train_mode(optimizer)
    assert optimizer.mode == "train"
    assert any("needs no learning-rate schedule" in n for n in notes)
    for _ in range(10):  # the lr stays the optimizer's: no schedule on top of its own
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1e-2 and scheduler.state_dict()["last_epoch"] == 10


def test_mode_helpers_do_nothing_for_other_optimizers():
    """For an optimizer without train()/eval() the helpers change neither the weights nor the optimizer's state."""
    param = torch.nn.Parameter(torch.zeros(64, 64))
    optimizer, scheduler, _ = build(param, optimizer_type="AdamW")
    train(optimizer, scheduler, param, 2)
    weights, state = param.detach().clone(), copy.deepcopy(optimizer.state_dict())
    optimizer_eval_mode(optimizer)
    optimizer_train_mode(optimizer)
    after = optimizer.state_dict()
    assert torch.equal(param.detach(), weights) and after["param_groups"] == state["param_groups"]
    assert after["state"].keys() == state["state"].keys() == {0}
    for key, value in state["state"][0].items():
        assert torch.equal(after["state"][0][key], value), key


# ---------------------------------------------------------------------------------------------------- D-Adaptation

DADAPT = {"DAdaptation": "DAdaptAdamPreprint", "DAdaptAdamPreprint": "DAdaptAdamPreprint",
          "DAdaptAdaGrad": "DAdaptAdaGrad", "DAdaptAdam": "DAdaptAdam", "DAdaptAdan": "DAdaptAdan",
          "DAdaptAdanIP": "DAdaptAdanIP", "DAdaptLion": "DAdaptLion", "DAdaptSGD": "DAdaptSGD"}


def test_dadapt_family_is_named_with_its_package():
    assert {name: OPTIMIZERS[name] for name in DADAPT} == dict.fromkeys(DADAPT, "dadaptation")


@pytest.mark.parametrize("name, cls", DADAPT.items())
def test_dadapt_optimizers_train_by_sd_scripts_names(name, cls):
    pytest.importorskip("dadaptation")
    param = torch.nn.Parameter(torch.zeros(64, 64))
    optimizer, scheduler, notes = build(param, lr=1.0, optimizer_type=name.lower())
    assert type(optimizer).__name__ == cls and not notes  # lr 1.0 is what sd-scripts recommends: no advice
    losses = train(optimizer, scheduler, param, 100)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert optimizer.param_groups[0]["d"] > 1e-6  # it grew its own step size from the package's starting d


def test_dadapt_gives_sd_scripts_learning_rate_advice():
    pytest.importorskip("dadaptation")
    param, other = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    _, _, notes = build(param, lr=1e-4, optimizer_type="DAdaptAdam",
                        groups=[{"params": [param], "lr": 1e-4}, {"params": [other], "lr": 5e-5}])
    assert any("DAdaptAdam adapts the step size itself" in n and "1.0 is the usual value (not 0.0001)" in n
               for n in notes)
    assert any("only the first one, 0.0001, takes effect" in n for n in notes)


@pytest.mark.parametrize("name", ["DAdaptAdam", "DAdaptation", "DAdaptAdanIP"])
def test_dadapt_without_the_package_is_one_clear_error(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "dadaptation", None)
    monkeypatch.setitem(sys.modules, "dadaptation.experimental", None)
    with pytest.raises(ConfigError, match=f"^optimizer_type {name} needs dadaptation: pip install dadaptation$"):
        build(torch.nn.Parameter(torch.zeros(4)), lr=1.0, optimizer_type=name)


def test_schedule_free_without_the_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", None)
    param = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match="optimizer_type AdamWScheduleFree needs schedulefree: pip install "
                                          "schedulefree"):
        build(param, optimizer_type="AdamWScheduleFree")
    assert OPTIMIZERS["RAdamScheduleFree"] == OPTIMIZERS["SGDScheduleFree"] == "schedulefree"


# ---------------------------------------------------------------------------------------------------- schedules


def factors(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0] / 0.5)
        scheduler.step()
    return out


def schedule(total=100, **overrides):
    param = torch.nn.Parameter(torch.zeros(2))
    _, scheduler, notes = build(param, total=total, lr=0.5, **overrides)
    return scheduler, notes


def test_inverse_sqrt_follows_the_closed_form_with_its_timescale():
    """transformers: after warmup w, 1/sqrt((s + T - w)/T) with T = timescale, else w (10000 when w is 0). The old
    formula, 1/sqrt((s - w + w)/w), fell to a third of the rate by step 9w."""
    for warmup, timescale, expected_scale in ((10, None, 10), (10, 40, 40), (0, None, 10_000)):
        scheduler, _ = schedule(lr_scheduler="inverse_sqrt", lr_warmup_steps=warmup, lr_scheduler_timescale=timescale)
        got = factors(scheduler, 100)
        for s in (0, 5, 10, 11, 50, 99):
            want = s / max(1, warmup) if s < warmup else 1 / math.sqrt((s + expected_scale - warmup) / expected_scale)
            assert got[s] == pytest.approx(want), (warmup, timescale, s)
    assert lr_lambda("inverse_sqrt", 10, 1000)(90) == pytest.approx(1 / math.sqrt(9))
    assert lr_lambda("inverse_sqrt", 0, 1000)(2500) == pytest.approx(1 / math.sqrt(1.25))


def test_piecewise_constant_step_rules():
    assert "piecewise_constant" in SCHEDULERS
    scheduler, _ = schedule(lr_scheduler="piecewise_constant", lr_scheduler_args=("step_rules=1:10,0.1:20,0.01",))
    got = factors(scheduler, 25)
    assert got[:10] == [1.0] * 10 and got[10:20] == pytest.approx([0.1] * 10) and got[20:] == pytest.approx([0.01] * 5)
    quoted, _ = schedule(lr_scheduler="piecewise_constant", lr_scheduler_args=('step_rules="0.5:3,2"',))
    assert factors(quoted, 5) == [0.5, 0.5, 0.5, 2.0, 2.0]
    with pytest.raises(ConfigError, match="piecewise_constant needs its rules in --lr_scheduler_args"):
        config(lr_scheduler="piecewise_constant")
    with pytest.raises(ConfigError, match="step_rules='1:x,0.1': expected multiplier:step pairs"):
        config(lr_scheduler="piecewise_constant", lr_scheduler_args=("step_rules=1:x,0.1",))


def test_lr_scheduler_type_builds_a_torch_scheduler_from_its_args():
    scheduler, _ = schedule(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=("T_max=10", "eta_min=0.05"))
    assert type(scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR and scheduler.T_max == 10
    scheduler, notes = schedule(lr_scheduler_type="torch.optim.lr_scheduler.StepLR", lr_warmup_steps=4,
                                lr_scheduler_args=("step_size=3", "gamma=0.5"))
    assert factors(scheduler, 7) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert any("lr_warmup_steps is ignored with lr_scheduler_type" in n for n in notes)
    with pytest.raises(ConfigError, match="lr_scheduler_args for StepLR: .*step_size"):
        schedule(lr_scheduler_type="StepLR")
    with pytest.raises(ConfigError, match="cannot import NoSuchLR from torch.optim.lr_scheduler"):
        schedule(lr_scheduler_type="NoSuchLR")
    with pytest.raises(ConfigError, match="steps on a measured loss"):
        schedule(lr_scheduler_type="ReduceLROnPlateau")
    with pytest.raises(ConfigError, match="lr_scheduler_type 'not a class'"):
        config(lr_scheduler_type="not a class")


def test_named_schedules_take_the_scheduler_args_sd_scripts_passes_on():
    cosine, _ = schedule(total=10, lr_scheduler="cosine", lr_scheduler_args=("num_cycles=1",))
    got = factors(cosine, 10)
    assert got[5] == pytest.approx(0.0, abs=1e-9) and got[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 1.8)))
    poly, _ = schedule(total=10, lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_scheduler_args=("lr_end=0.1",))
    assert factors(poly, 10)[5] == pytest.approx(((0.5 - 0.1) * 0.25 + 0.1) / 0.5)
    floor, _ = schedule(total=10, lr_scheduler="cosine_with_min_lr", lr_scheduler_args=("min_lr=0.05",))
    assert factors(floor, 10)[5] == pytest.approx(0.5 * 0.9 + 0.1)
    with pytest.raises(ConfigError, match="lr_scheduler_args T_max: lr_scheduler constant takes none"):
        schedule(lr_scheduler_args=("T_max=10",))
    with pytest.raises(ConfigError, match="decay_type: expected one of linear, cosine, 1-sqrt"):
        schedule(lr_scheduler="warmup_stable_decay", lr_scheduler_args=("decay_type=step",))


def test_polynomial_end_is_an_absolute_lr():
    """transformers' lr_end (1e-7) is a learning rate, not a factor: at lr 0.5 the last factor is 2e-7."""
    poly, _ = schedule(total=10, lr_scheduler="polynomial")
    assert factors(poly, 11)[10] == pytest.approx(1e-7 / 0.5)


def test_cosine_with_min_lr_and_warmup_stable_decay_closed_forms():
    total, warmup, decay, ratio = 100, 10, 20, 0.2
    floor, _ = schedule(total=total, lr_scheduler="cosine_with_min_lr", lr_warmup_steps=warmup,
                        lr_scheduler_min_lr_ratio=ratio)
    got = factors(floor, total)
    for s in (0, 5, 10, 55, 99):
        p = (s - warmup) / (total - warmup)
        want = s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * p)) * (1 - ratio) + ratio
        assert got[s] == pytest.approx(want)
    wsd, _ = schedule(total=total, lr_scheduler="warmup_stable_decay", lr_warmup_steps=warmup,
                      lr_decay_steps=0.2, lr_scheduler_min_lr_ratio=ratio)
    got = factors(wsd, total)
    assert decay == int(0.2 * total)
    for s in (0, 5, 10, 79, 80, 90, 99):  # transformers: warmup from the floor, cosine decay to it
        if s < warmup:
            want = s / warmup * (1 - ratio) + ratio
        elif s < total - decay:
            want = 1.0
        else:
            want = 0.5 * (1 + math.cos(math.pi * (s - (total - decay)) / decay)) * (1 - ratio) + ratio
        assert got[s] == pytest.approx(want), s
    linear, _ = schedule(total=total, lr_scheduler="warmup_stable_decay", lr_decay_steps=decay,
                         lr_scheduler_args=("decay_type=linear",))
    assert factors(linear, total)[90] == pytest.approx(0.5)


def test_warmup_as_a_fraction_of_the_steps():
    """lr_warmup_steps 0.1 (the CLI turns "10%" into it) is a tenth of the run."""
    scheduler, _ = schedule(total=200, lr_scheduler="linear", lr_warmup_steps=0.1)
    got = factors(scheduler, 200)
    assert got[10] == pytest.approx(0.5) and got[20] == pytest.approx(1.0) and got[110] == pytest.approx(0.5)


def test_constant_with_warmup_steps_says_they_do_nothing():
    scheduler, notes = schedule(lr_scheduler="constant", lr_warmup_steps=5)
    assert factors(scheduler, 3) == [1.0, 1.0, 1.0]
    assert any("constant_with_warmup warms up" in n for n in notes)
