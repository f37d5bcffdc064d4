"""The metrics log as a Reporter beside the front end's: `<name>_metrics.jsonl` (one line per optimizer step), and the
trackers sd-scripts logs to (`--log_with tensorboard|wandb|all`, or TensorBoard whenever `--logging_dir` is given)
under sd-scripts' tag names, so dashboards made for sd-scripts runs read ours.

sd-scripts' layout (train_util.prepare_accelerator / init_trackers, accelerate's trackers): TensorBoard writes to
`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or "network_train">`; wandb's project is that tracker
name, its files go under the same run folder, its run name is --wandb_run_name; --log_tracker_config is a TOML file of
keyword arguments per tracker (`[wandb]` for wandb.init, `[tensorboard]` for SummaryWriter); --log_config logs the
options (less keys and paths) as hyper-parameters. Step tags (train_network.generate_step_logs) go at the global step,
epoch tags at the epoch number; wandb gets `global_step` and `epoch` in every record instead of a step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import SaveError, atomic_path, failure_reason, remove_stale_temporaries, save_error, write_bytes
from .errors import ConfigError
from .events import EpochEnd, Event, Finished, Message, Samples, StepEnd, ValidationEnd
from .output_names import metrics_name

DEFAULT_TRACKER_NAME = "network_train"  # train_network.py's default_tracker_name
# get_sanitized_config_or_none leaves these out of the logged options (keys, and paths that say who trained)
_SENSITIVE = ("wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
              "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir",
              "datasets")  # ours: the typed datasets the nodes build hold image folders too
# our optimizer-group name prefixes (LoRANetwork.param_groups) -> sd-scripts' lr descriptions (lora_flux
# prepare_optimizer_params_with_multiple_te_lrs); the text encoders' keep its trailing space
_GROUP_PREFIXES = {"lora_unet": "unet", "lora_te1": "textencoder 1 ", "lora_te3": "textencoder 2 "}


def resolve_log_with(config) -> str | None:
    """sd-scripts' rule: no --log_with but a --logging_dir means TensorBoard."""
    if config.logging.log_with is None:
        return "tensorboard" if config.logging.logging_dir is not None else None
    return config.logging.log_with


def _installed(module: str) -> bool:
    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def read_tracker_config(path: str | None) -> dict:
    """--log_tracker_config: a TOML file of keyword arguments per tracker (`[wandb]`, `[tensorboard]`)."""
    if path is None:
        return {}
    from .tomlio import NotText, TOMLError, loads, read_text

    try:
        data = loads(read_text(path))
    except OSError as e:
        raise ConfigError(f"log_tracker_config: {path} cannot be read ({e.strerror or e})") from e
    except NotText as e:
        raise ConfigError(f"log_tracker_config: {path} {e}") from e
    except TOMLError as e:
        raise ConfigError(f"log_tracker_config: {path} is not valid TOML ({e})") from e
    for name in ("tensorboard", "wandb"):
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"log_tracker_config: {path}: [{name}] must be a table of {name} settings, not "
                              f"{data[name]!r}")
    return data


def check_trackers(config) -> None:
    """What sd-scripts refuses before training, as one ConfigError: TensorBoard without --logging_dir, wandb not
    installed, an unreadable --log_tracker_config. Cheap; call it before any model loads."""
    log_with = resolve_log_with(config)
    if log_with in ("tensorboard", "all") and config.logging.logging_dir is None:
        raise ConfigError(f"log_with {log_with}: TensorBoard needs --logging_dir (the folder its runs go in)")
    if log_with in ("wandb", "all") and not _installed("wandb"):
        raise ConfigError(f"log_with {log_with}: Weights & Biases is not installed: pip install wandb (or log with "
                          "--log_with tensorboard)")
    read_tracker_config(config.logging.log_tracker_config)


def config_hparams(config) -> dict | None:
    """--log_config: the options as flat, loggable values (sd-scripts' get_sanitized_config_or_none), or None."""
    if not config.logging.log_config:
        return None
    flat: dict = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # network / flow: sd-scripts' flat names
            flat.update({sub.name: getattr(value, sub.name) for sub in dataclasses.fields(value)})
        else:
            flat[f.name] = value
    out = {}
    for key, value in flat.items():
        if key in _SENSITIVE:
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value if value is None or isinstance(value, (bool, str, int, float)) else f"{value}"
    return out


@dataclass(frozen=True)
class TrackerPlan:
    """Which trackers to open and how, resolved from the options at the start of the run."""
    tensorboard: bool = False
    wandb: bool = False
    run_dir: Path | None = None  # <logging_dir>/<log_prefix><timestamp>
    project: str = DEFAULT_TRACKER_NAME
    init_kwargs: dict = field(default_factory=dict)  # per tracker name
    hparams: dict | None = None
    wandb_api_key: str | None = None
    optimizer_type: str = ""

    @classmethod
    def from_config(cls, config, now: float | None = None) -> "TrackerPlan":
        log_with = resolve_log_with(config)
        run_dir = None
        if config.logging.logging_dir is not None:
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
            run_dir = Path(config.logging.logging_dir) / f"{config.logging.log_prefix or ''}{stamp}"
        init_kwargs = {"wandb": {"name": config.logging.wandb_run_name}} if config.logging.wandb_run_name else {}
        for name, kwargs in read_tracker_config(config.logging.log_tracker_config).items():
            # sd-scripts lets the file replace --wandb_run_name entirely; here the file's keys win over it
            init_kwargs[name] = {**init_kwargs.get(name, {}), **kwargs} if isinstance(kwargs, dict) else kwargs
        return cls(tensorboard=log_with in ("tensorboard", "all"), wandb=log_with in ("wandb", "all"),
                   run_dir=run_dir, project=config.logging.log_tracker_name or DEFAULT_TRACKER_NAME,
                   init_kwargs=init_kwargs,
                   hparams=config_hparams(config), wandb_api_key=config.logging.wandb_api_key,
                   optimizer_type=config.optimizer.optimizer_type or "")


def lr_description(name: str) -> str:
    """sd-scripts' description of an optimizer group from our group name: "lora_unet" -> "unet", "lora_unet plus"
    -> "unet plus", "lora_te1" -> "textencoder 1 ", "lora_te3 plus" -> "textencoder 2  plus"."""
    prefix, _, rest = name.partition(" ")
    if prefix not in _GROUP_PREFIXES:
        return name
    head = _GROUP_PREFIXES[prefix]
    return head + (" " + rest if rest else "")


def step_logs(event: StepEnd, optimizer_type: str = "") -> dict:
    """The step's tags and values as train_network.generate_step_logs names them."""
    logs = {"loss/current": event.loss, "loss/average": event.average_loss}
    if event.keys_scaled is not None:
        logs["max_norm/keys_scaled"] = event.keys_scaled
        logs["max_norm/max_key_norm"] = event.max_norm
    if event.mean_norm is not None:
        logs["norm/avg_key_norm"] = event.mean_norm
    kind = optimizer_type.lower()
    adaptive = kind.startswith("dadapt") or kind == "prodigy"
    groups = event.groups
    if not groups:
        logs["lr/unet"] = event.lr
        return logs
    for i, group in enumerate(groups):
        desc = lr_description(group.name) if group.name else f"group{i}"
        logs[f"lr/{desc}"] = group.lr
        if adaptive and group.d is not None:
            logs[f"lr/d*lr/{desc}"] = group.d * group.lr
    if kind.endswith("prodigyplusschedulefree") and groups[0].d is not None:
        logs["lr/d*lr"] = groups[0].d * groups[0].lr
    return logs


class MetricsLog:
    """`MetricsLog.from_config(config, warn)` in a run; `MetricsLog(folder, name)` writes the jsonl file alone."""

    def __init__(self, folder: Path, name: str, log_with: str | None = None, warn=None,
                 plan: TrackerPlan | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / metrics_name(name)
        self.warn = warn or (lambda message: None)
        if plan is None and log_with is not None:  # without options: TensorBoard runs in the log's folder
            plan = TrackerPlan(tensorboard=log_with in ("tensorboard", "all"), wandb=log_with in ("wandb", "all"),
                               run_dir=folder / time.strftime("%Y%m%d%H%M%S"))
        self.plan = plan or TrackerPlan()
        self.tensorboard = None
        self.wandb = None  # the wandb run
        self._wandb_module = None
        self.last_average: float | None = None
        remove_stale_temporaries(self.path)  # left by a process killed while it rewrote the log
        # opened at the first line this run writes: a run that fails before its first step leaves the log of the
        # run before it as it was
        self.file = None
        self._kept_lines: list[str] | None = None  # truncate_after's lines, written when the first new line comes
        try:
            self._open_trackers()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, config, warn, now: float | None = None) -> "MetricsLog":
        """The log of a run: jsonl in --logging_dir (else --output_dir), the trackers the options ask for."""
        return cls(Path(config.logging.logging_dir or config.saving.output_dir), config.saving.name, warn=warn,
                   plan=TrackerPlan.from_config(config, now))

    def _open_trackers(self) -> None:
        plan = self.plan
        if plan.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.warn(Message("log_with tensorboard: tensorboard is not installed (pip install tensorboard); "
                                  "metrics go to the jsonl file only", "warning"))
            else:
                folder = (plan.run_dir or self.path.parent) / plan.project
                self.tensorboard = SummaryWriter(str(folder), **plan.init_kwargs.get("tensorboard", {}))
                if plan.hparams is not None:
                    self.tensorboard.add_hparams(plan.hparams, metric_dict={})
                    self.tensorboard.flush()
        if plan.wandb:
            import wandb  # check_trackers said so before training if it is missing

            self._wandb_module = wandb
            if plan.wandb_api_key is not None:
                wandb.login(key=plan.wandb_api_key)
            kwargs = dict(plan.init_kwargs.get("wandb", {}))
            if plan.run_dir is not None:  # sd-scripts points WANDB_DIR at the run folder
                plan.run_dir.mkdir(parents=True, exist_ok=True)
                kwargs.setdefault("dir", str(plan.run_dir))
            self.wandb = wandb.init(project=plan.project, **kwargs)
            if plan.hparams is not None:
                wandb.config.update(plan.hparams, allow_val_change=True)
            for metric in ("epoch", "val_step", "global_step"):
                self.wandb.define_metric(metric, hidden=True)

    # ------------------------------------------------------------------------------------------ events

    def emit(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            self._write_line(event)
            self.last_average = event.average_loss
            self._log(step_logs(event, self.plan.optimizer_type), event.step, event.step, event.epoch)
        elif isinstance(event, EpochEnd):
            self._log({"loss/epoch_average": event.average_loss}, event.epoch, event.step, event.epoch)
        elif isinstance(event, ValidationEnd):
            divergence = event.divergence
            if divergence is None and self.last_average is not None:
                divergence = event.average_loss - self.last_average
            kind = "epoch" if event.per_epoch else "step"
            self._append({"step": event.step, "epoch": event.epoch, "validation_loss": event.average_loss,
                          "validation_divergence": divergence, "validation_at": kind}, event.step)
            logs = {f"loss/validation/{kind}_average": event.average_loss}
            if divergence is not None:
                logs[f"loss/validation/{kind}_divergence"] = divergence
            self._log(logs, event.epoch if event.per_epoch else event.step, event.step, event.epoch)
        elif isinstance(event, Samples):
            self._log_samples(event)
        elif isinstance(event, Finished):
            self.close()

    def _write_line(self, event: StepEnd) -> None:
        self._append({"step": event.step, "epoch": event.epoch, "loss": event.loss,
                      "average_loss": event.average_loss, "lr": event.lr}, event.step)

    def _append(self, values: dict, step: int) -> None:
        self._open()
        whole = os.fstat(self.file.fileno()).st_size  # the log ends with a whole line here
        try:
            self.file.write(json.dumps(values) + "\n")
            self.file.flush()
        except OSError as e:
            raise self._write_failed(e, step, whole) from e

    def _log(self, logs: dict, axis: int, global_step: int, epoch: int) -> None:
        """accelerator_logging: TensorBoard at `axis` (the global step, or the epoch for epoch tags); wandb with
        global_step and epoch in the record."""
        if self.tensorboard is not None:
            for tag, value in logs.items():
                self.tensorboard.add_scalar(tag, value, global_step=axis)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({**logs, "global_step": global_step, "epoch": epoch})

    def _log_samples(self, event: Samples) -> None:
        """wandb shows each preview as sample_{prompt number}, captioned with its prompt, committed with the next
        record (sd-scripts' sample_image_inference)."""
        if self.wandb is None or not event.images:
            return
        for n, image in enumerate(event.images):
            index = event.indices[n] if n < len(event.indices) else n
            caption = event.prompts[n] if n < len(event.prompts) else None
            self.wandb.log({f"sample_{index}": self._wandb_module.Image(image, caption=caption)}, commit=False)

    def _write_failed(self, error: OSError, step: int, whole: int) -> SaveError:
        """Close the log dropping what could not be written, cut a half-written line, and say so (a full disk)."""
        try:
            self.file.close()
        except OSError:
            pass  # the rest of the buffer could not be written either: dropped
        try:
            os.truncate(self.path, whole)
        except OSError:
            pass
        return save_error(self.path, error, text=f"{self.path}: the metrics line of step {step} could not be written "
                                                 f"({failure_reason(error)}); the lines before it are intact")

    def _open(self) -> None:
        """Open the log for appending at the run's first line, first cutting it as truncate_after said."""
        if self.file is not None:
            return
        if self._kept_lines is not None:
            with atomic_path(self.path) as tmp:
                write_bytes(tmp, "".join(self._kept_lines).encode("utf-8"))
            self._kept_lines = None
        self.file = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> int:
        """Drop the lines of steps after `step` (a resumed run trains them again) and any damaged line (a kill
        while writing); returns how many lines are dropped. The file is replaced in one rename when this run writes
        its first line (at once if it has written some): until then the log is as the run before left it."""
        if self.file is not None:
            self.file.flush()
        kept, dropped = [], 0
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        values = json.loads(line)
                        keep = line.endswith("\n") and isinstance(values, dict) and int(values["step"]) <= step
                    except (ValueError, KeyError, TypeError):
                        keep = False
                    if keep:
                        kept.append(line)
                    else:
                        dropped += 1
        except FileNotFoundError:
            return 0
        if dropped:
            self._kept_lines = kept
            if self.file is not None:
                self.file.close()
                self.file = None
                self._open()
        return dropped

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        """Idempotent: the run's end closes it, and `train` again on every way out."""
        if self.file is not None and not self.file.closed:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish()


class Fanout:
    """Events to several reporters; the first (the front end's) decides when to stop."""

    def __init__(self, front_end, *others) -> None:
        self.front_end = front_end
        self.others = [o for o in others if o is not None]

    def emit(self, event: Event) -> None:
        for other in self.others:
            other.emit(event)
        self.front_end.emit(event)

    def should_stop(self) -> bool:
        return self.front_end.should_stop()
