"""The trackers log under sd-scripts' names and layout (train_network.py generate_step_logs / accelerator_logging,
train_util.prepare_accelerator / init_trackers, accelerate's TensorBoard and wandb trackers), so dashboards made for
sd-scripts runs read ours. TensorBoard and wandb are fakes in sys.modules: neither package is needed."""

import json
import sys
import time
import types
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.events import EpochEnd, Finished, GroupLR, Message, Samples, StepEnd, ValidationEnd
from trainer.metrics import MetricsLog, check_trackers, config_hparams, lr_description, step_logs

NOW = 1_800_000_000.0  # a fixed clock for the run folder's time stamp


def config(**options) -> TrainConfig:
    return TrainConfig.from_flags(pretrained_model_name_or_path="f.safetensors", clip_l="c.safetensors",
                                  t5xxl="t.safetensors", ae="a.safetensors", train_data_dir="images", **options)


class FakeWriter:
    made: list = []

    def __init__(self, log_dir, **kwargs):
        self.log_dir, self.kwargs, self.scalars, self.hparams, self.closed = log_dir, kwargs, [], [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))

    def add_hparams(self, hparams, metric_dict):
        self.hparams.append((hparams, metric_dict))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def tensorboard(monkeypatch):
    FakeWriter.made = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    return FakeWriter.made


@pytest.fixture
def wandb(monkeypatch):
    calls = []

    class Run:
        def log(self, values, **kwargs):
            calls.append(("log", values, kwargs))

        def define_metric(self, name, **kwargs):
            calls.append(("define_metric", name, kwargs))

        def finish(self):
            calls.append(("finish",))

    class Image:
        def __init__(self, image, caption=None):
            self.image, self.caption = image, caption

    module = types.ModuleType("wandb")
    module.login = lambda **kwargs: calls.append(("login", kwargs))
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    module.config = types.SimpleNamespace(update=lambda values, **kwargs: calls.append(("config", values, kwargs)))
    module.Image = Image
    module.calls = calls
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def step(n, **fields):
    return StepEnd(n, 10, 1, 0.25, 0.2, 1e-4, 1.0, **fields)


def test_step_tags_are_sd_scripts_names(tmp_path, tensorboard):
    log = MetricsLog.from_config(config(logging_dir=str(tmp_path / "logs"), output_name="run"), print, now=NOW)
    log.emit(step(3, groups=(GroupLR("lora_te1", 5e-5), GroupLR("lora_te3", 2e-5), GroupLR("lora_unet", 1e-4),
                             GroupLR("lora_unet plus", 1.6e-3))))
    assert tensorboard[0].scalars == [("loss/current", 0.25, 3), ("loss/average", 0.2, 3),
                                      ("lr/textencoder 1 ", 5e-5, 3), ("lr/textencoder 2 ", 2e-5, 3),
                                      ("lr/unet", 1e-4, 3), ("lr/unet plus", 1.6e-3, 3)]
    log.close()
    assert tensorboard[0].closed
    assert json.loads((tmp_path / "logs" / "run_metrics.jsonl").read_text()) == {
        "step": 3, "epoch": 1, "loss": 0.25, "average_loss": 0.2, "lr": 1e-4}  # the jsonl file is unchanged


def test_lr_descriptions_and_adaptive_optimizer_tags():
    assert [lr_description(n) for n in ("lora_unet", "lora_unet reg_lr_0", "lora_unet reg_lr_0 plus", "lora_te1 plus",
                                        "lora_te3 reg_lr_1")] == [
        "unet", "unet reg_lr_0", "unet reg_lr_0 plus", "textencoder 1  plus", "textencoder 2  reg_lr_1"]
    groups = (GroupLR("lora_unet", 1.0, d=2e-4), GroupLR("lora_te1", 0.5, d=1e-4))
    prodigy = step_logs(step(1, groups=groups), "Prodigy")
    assert prodigy["lr/d*lr/unet"] == 2e-4 and prodigy["lr/d*lr/textencoder 1 "] == 5e-5
    assert "lr/d*lr/unet" in step_logs(step(1, groups=groups), "DAdaptAdam")
    assert not any("d*lr" in k for k in step_logs(step(1, groups=groups), "prodigyopt.Prodigy"))  # as sd-scripts
    assert step_logs(step(1, groups=groups), "prodigyplus.ProdigyPlusScheduleFree")["lr/d*lr"] == 2e-4
    assert step_logs(step(1), "")["lr/unet"] == 1e-4  # no groups: the one lr
    norms = step_logs(step(1, keys_scaled=3, mean_norm=0.5, max_norm=0.9))
    assert (norms["max_norm/keys_scaled"], norms["max_norm/max_key_norm"], norms["norm/avg_key_norm"]) == (3, 0.9, 0.5)


def test_epoch_and_validation_tags_and_their_x_axis(tmp_path, tensorboard):
    log = MetricsLog.from_config(config(logging_dir=str(tmp_path)), print, now=NOW)
    log.emit(step(40))
    log.emit(ValidationEnd(40, 2, 0.3))
    log.emit(ValidationEnd(50, 2, 0.35, per_epoch=True, divergence=0.1))
    log.emit(EpochEnd(2, 50, 0.22))
    scalars = tensorboard[0].scalars[3:]
    assert scalars[0][0] == "loss/validation/step_average" and scalars[0][2] == 40
    assert scalars[1][0] == "loss/validation/step_divergence" and scalars[1][1] == pytest.approx(0.1)
    assert scalars[2:] == [("loss/validation/epoch_average", 0.35, 2), ("loss/validation/epoch_divergence", 0.1, 2),
                           ("loss/epoch_average", 0.22, 2)]  # epoch tags at the epoch number, as sd-scripts
    log.close()


def test_tensorboard_run_folder_name_and_tracker_options(tmp_path, tensorboard):
    (tmp_path / "trackers.toml").write_text("[tensorboard]\nflush_secs = 5\n")
    logs = tmp_path / "logs"
    log = MetricsLog.from_config(config(logging_dir=str(logs), log_prefix="flux-", log_tracker_name="mine",
                                        log_tracker_config=str(tmp_path / "trackers.toml"), log_config=True,
                                        wandb_api_key="secret"), print, now=NOW)
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(NOW))
    writer = tensorboard[0]
    assert Path(writer.log_dir) == logs / f"flux-{stamp}" / "mine" and writer.kwargs == {"flush_secs": 5}
    hparams, metrics = writer.hparams[0]
    assert metrics == {} and hparams["log_prefix"] == "flux-" and hparams["network_dim"] == 4
    assert not {"wandb_api_key", "output_dir", "logging_dir", "pretrained_model_name_or_path"} & set(hparams)
    log.close()
    MetricsLog.from_config(config(logging_dir=str(logs)), print, now=NOW).close()  # no --log_with: TensorBoard
    assert Path(tensorboard[1].log_dir) == logs / stamp / "network_train"


def test_check_trackers_refuses_what_sd_scripts_refuses(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    check_trackers(config())
    check_trackers(config(logging_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="needs --logging_dir"):
        check_trackers(config(log_with="tensorboard"))
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_trackers(config(log_with="wandb"))
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_trackers(config(log_with="all", logging_dir=str(tmp_path)))
    (tmp_path / "bad.toml").write_text("[wandb\n")
    with pytest.raises(ConfigError, match="log_tracker_config.*not valid TOML"):
        check_trackers(config(log_tracker_config=str(tmp_path / "bad.toml")))
    (tmp_path / "bad.toml").write_text('wandb = "x"\n')
    with pytest.raises(ConfigError, match=r"\[wandb\] must be a table"):
        check_trackers(config(log_tracker_config=str(tmp_path / "bad.toml")))


def test_wandb_run(tmp_path, wandb):
    check_trackers(config(log_with="wandb"))  # installed (the fake): accepted
    (tmp_path / "trackers.toml").write_text('[wandb]\nentity = "team"\ntags = ["flux"]\n')
    log = MetricsLog.from_config(config(log_with="wandb", logging_dir=str(tmp_path / "logs"), log_prefix="p",
                                        wandb_run_name="first try", wandb_api_key="k3y", log_config=True,
                                        log_tracker_config=str(tmp_path / "trackers.toml")), print, now=NOW)
    calls = wandb.calls
    assert calls[0] == ("login", {"key": "k3y"})
    init = calls[1][1]
    assert init["project"] == "network_train" and init["name"] == "first try" and init["entity"] == "team"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(NOW))
    assert init["tags"] == ["flux"] and Path(init["dir"]) == tmp_path / "logs" / f"p{stamp}"
    assert Path(init["dir"]).is_dir()
    assert calls[2][0] == "config" and "wandb_api_key" not in calls[2][1] and calls[2][2] == {"allow_val_change": True}
    assert [c[1] for c in calls[3:6]] == ["epoch", "val_step", "global_step"]
    del calls[:]
    log.emit(step(7, groups=(GroupLR("lora_unet", 1e-4),)))
    log.emit(EpochEnd(1, 7, 0.21))
    log.emit(Samples(7, (tmp_path / "a.png",), ("IMAGE",), prompts=("a cat",), indices=(2,)))
    log.emit(Finished(None, 7, False))
    assert calls[0] == ("log", {"loss/current": 0.25, "loss/average": 0.2, "lr/unet": 1e-4, "global_step": 7,
                                "epoch": 1}, {})
    assert calls[1] == ("log", {"loss/epoch_average": 0.21, "global_step": 7, "epoch": 1}, {})
    (_, sample, kwargs) = calls[2]
    assert kwargs == {"commit": False} and sample["sample_2"].caption == "a cat" and sample["sample_2"].image == "IMAGE"
    assert calls[3:] == [("finish",)]
    log.close()  # again, from train()'s finally: nothing more
    assert calls[3:] == [("finish",)]


def test_tracker_config_file_names_the_wandb_run(tmp_path, wandb):
    (tmp_path / "trackers.toml").write_text('[wandb]\nname = "from the file"\n')
    MetricsLog.from_config(config(log_with="wandb", wandb_run_name="flag", output_dir=str(tmp_path),
                                  log_tracker_config=str(tmp_path / "trackers.toml")), print).close()
    assert wandb.calls[0] == ("init", {"project": "network_train", "name": "from the file"})


def test_missing_tensorboard_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    messages = []
    log = MetricsLog.from_config(config(logging_dir=str(tmp_path)), messages.append)
    log.emit(step(1))
    log.close()
    assert isinstance(messages[0], Message) and "pip install tensorboard" in messages[0].text
    assert (tmp_path / "last_metrics.jsonl").read_text().count("\n") == 1


def test_config_hparams_only_with_log_config():
    assert config_hparams(config()) is None
    values = config_hparams(config(log_config=True, text_encoder_lr=(1e-5, 2e-5)))
    assert values["text_encoder_lr"] == "[1e-05, 2e-05]" and values["timestep_sampling"] == "sigma"
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in values.values())


def test_validation_loss_is_in_the_jsonl_and_on_the_console(tmp_path, capsys):
    from trainer.console import ConsoleReporter

    log = MetricsLog(tmp_path, "run")
    log.emit(StepEnd(2, 4, 1, 0.5, 0.25, 1e-3, 1.0))
    validation = ValidationEnd(2, 1, 0.375)
    log.emit(validation)
    log.emit(ValidationEnd(4, 1, 0.5, per_epoch=True, divergence=0.125))
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "run_metrics.jsonl").read_text().splitlines()]
    assert lines[1:] == [
        {"step": 2, "epoch": 1, "validation_loss": 0.375, "validation_divergence": 0.125, "validation_at": "step"},
        {"step": 4, "epoch": 1, "validation_loss": 0.5, "validation_divergence": 0.125, "validation_at": "epoch"}]
    ConsoleReporter().emit(validation)
    assert "validation loss at step 2: 0.3750" in capsys.readouterr().out


def test_a_run_that_writes_no_step_leaves_the_previous_log_as_it_was(tmp_path):
    previous = '{"step": 1, "epoch": 1, "loss": 0.5, "average_loss": 0.5, "lr": 0.001}\n'
    (tmp_path / "run_metrics.jsonl").write_text(previous)
    failed = MetricsLog(tmp_path, "run")
    assert failed.truncate_after(0) == 1  # a new run: the old lines go, but only once it logs a step
    failed.close()
    assert (tmp_path / "run_metrics.jsonl").read_text() == previous
    new = MetricsLog(tmp_path, "run")
    new.truncate_after(0)
    new.emit(StepEnd(1, 4, 1, 0.25, 0.25, 1e-3, 1.0))
    new.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "run_metrics.jsonl").read_text().splitlines()] == [0.25]


def test_a_failed_run_keeps_the_previous_runs_metrics(tmp_path, tokenizer_dirs, monkeypatch):
    from trainer import flow
    from trainer.errors import NonFiniteError
    from trainer.events import SilentReporter
    from trainer.loop import train

    from trainspace import config as train_config
    from trainspace import make_workspace

    ws = make_workspace(tmp_path / "ws")
    out = tmp_path / "out"
    train(train_config(ws, tokenizer_dirs, out, max_train_steps=2), SilentReporter())
    before = (out / "test_lora_metrics.jsonl").read_bytes()
    assert before.count(b"\n") == 2
    original = flow.batch_loss
    monkeypatch.setattr(flow, "batch_loss", lambda *a, **k: original(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError):  # fails in its first step, having logged nothing
        train(train_config(ws, tokenizer_dirs, out, max_train_steps=3), SilentReporter())
    assert (out / "test_lora_metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("content, message", [(b"[wandb]\n".decode().encode("utf-16-le"), "holds NUL characters"),
                                              (b"a = " + b"[" * 100_000, "nested more than 100 levels deep")])
def test_tracker_config_files_that_would_end_in_a_traceback_are_named(tmp_path, content, message):
    (tmp_path / "odd.toml").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"log_tracker_config: .*odd\.toml.*{message}"):
        check_trackers(config(log_tracker_config=str(tmp_path / "odd.toml")))
