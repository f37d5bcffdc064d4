"""Flow-matching options: how sigma is drawn, what the model predicts, how the loss is weighed. sd-scripts' names and
defaults; torch-free (the CLI parser and the ComfyUI widgets read the choices from here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowConfig:
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    def __post_init__(self):
        for option, value, choices in (("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS),
                                       ("model_prediction_type", self.model_prediction_type, PREDICTION_TYPES),
                                       ("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES),
                                       ("loss_type", self.loss_type, LOSS_TYPES),
                                       ("huber_schedule", self.huber_schedule, HUBER_SCHEDULES)):
            if value not in choices:
                raise ConfigError(f"{option}: expected one of {', '.join(choices)}, not {value!r}")
        if self.loss_type in ("huber", "smooth_l1") and self.huber_schedule == "snr":
            # sd-scripts crashes here: its FLUX scheduler has no alphas_cumprod to compute an SNR from
            raise ConfigError("huber_schedule 'snr' needs an SNR that flow matching does not have; use "
                             "--huber_schedule constant or exponential with --loss_type huber/smooth_l1")
        if self.discrete_flow_shift <= 0:
            raise ConfigError(f"discrete_flow_shift: expected a positive number, not {self.discrete_flow_shift}")
