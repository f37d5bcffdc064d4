"""What to say when a step's loss, gradients or the LoRA's weights become NaN or infinite: the settings of the run that
are actually unusual, most specific first, instead of one fixed guess. Pure (no torch): the training loop passes the
config and the facts it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config.optim import adafactor_relative_step, canonical_optimizer, is_learning_rate_free, parse_optimizer_args

if TYPE_CHECKING:
    from .config import TrainConfig

STAGES = ("loss", "gradients", "weights")
# above this a fixed-rate optimizer's learning rate is unusual for a FLUX.1 LoRA (1e-4 to 1e-3 are the usual values)
HIGH_LR = 1e-3
# learning-rate-free optimizers (D-Adaptation, Prodigy) take a multiplier around 1.0
HIGH_LR_MULTIPLIER = 10.0
# optimizers whose state is not kept in the weights' dtype (bitsandbytes' 8-bit and 32-bit ones)
STATE_OUTSIDE_FP16 = ("AdamW8bit", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit")


@dataclass(frozen=True)
class NonFiniteFacts:
    """stage: where the NaN/inf was seen ("loss", "gradients": before the optimizer step; "weights": after it);
    loss: the step's loss; batch_files: the images of the step's batch."""
    stage: str
    loss: float | None = None
    batch_files: tuple[str, ...] = ()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {', '.join(STAGES)}, not {self.stage!r}")


def likely_causes(config: "TrainConfig", facts: NonFiniteFacts) -> list[str]:
    """The likely causes, most specific first; the learning rate or the batch's data close the list when nothing
    more specific is unusual."""
    causes = [*_precision(config, facts), *_network(config), *_learning_rates(config), *_starting_weights(config),
              *_weight_rescaling(config, facts)]
    if facts.stage != "weights":
        causes.append(f"a broken image or cached latent in this batch ({_files(facts.batch_files)})")
    elif not causes:
        causes.append(f"a learning rate too high for this data ({config.optimizer.learning_rate:g}), though it is in "
                      "the usual range")
    return causes


def describe(config: "TrainConfig", facts: NonFiniteFacts) -> str:
    """One sentence for the stop message: 'Likely causes: ...; ....'"""
    return "Likely causes: " + "; ".join(likely_causes(config, facts)) + "."


def _precision(config: "TrainConfig", facts: NonFiniteFacts) -> list[str]:
    optimizer = canonical_optimizer(config.optimizer.optimizer_type)
    if config.memory.full_fp16 and optimizer not in STATE_OUTSIDE_FP16:
        return [f"full_fp16 keeps the LoRA weights, and so {optimizer}'s moments, in fp16: eps (1e-8) rounds to 0 "
                "there and squared gradients below ~6e-8 underflow to 0, so an update can divide 0 by 0 - the "
                "learning rate is not the cause; use --mixed_precision bf16 (with --full_bf16 for the same memory), "
                "or an optimizer whose state is not fp16 (AdamW8bit, PagedAdamW32bit)"]
    if config.memory.mixed_precision == "fp16" and facts.stage != "weights":
        return ["fp16 overflow in the model's activations (FLUX.1 was trained in bf16, whose range fp16 lacks; use "
                "--mixed_precision bf16)"]
    return []


def _network(config: "TrainConfig") -> list[str]:
    network = config.network
    scale = network.network_alpha / network.network_dim
    if scale > 1:
        return [f"network_alpha {network.network_alpha:g} over rank {network.network_dim} multiplies the LoRA's "
                f"output by {scale:g} (alpha = rank gives 1, the usual is 1 or below)"]
    return []


def _learning_rates(config: "TrainConfig") -> list[str]:
    optimizer = canonical_optimizer(config.optimizer.optimizer_type)
    if optimizer == "Adafactor" and adafactor_relative_step(parse_optimizer_args(config.optimizer.optimizer_args)):
        return []  # it sets its own step size
    limit, usual = ((HIGH_LR_MULTIPLIER, "a multiplier around 1.0") if is_learning_rate_free(optimizer)
                    else (HIGH_LR, "1e-4 to 1e-3 for a FLUX.1 LoRA"))
    rates = {"learning_rate": config.optimizer.learning_rate, "unet_lr": config.optimizer.unet_lr}
    rates.update({f"text_encoder_lr[{i}]": lr for i, lr in enumerate(config.optimizer.text_encoder_lr or ())})
    label = {"learning_rate": "a learning rate"}
    return [f"{label.get(name, name)} too high ({lr:g}) for {optimizer} (usually {usual})"
            for name, lr in rates.items() if lr is not None and lr > limit]


def _starting_weights(config: "TrainConfig") -> list[str]:
    causes = []
    if config.models.network_weights:
        causes.append(f"the LoRA starts from --network_weights {Path(config.models.network_weights).name} (NaN or very "
                      "large values there carry into every step)")
    if config.models.base_weights:
        multipliers = config.models.base_weights_multiplier or (1.0,) * len(config.models.base_weights)
        merged = ", ".join(f"{Path(p).name} x{m:g}" for p, m in zip(config.models.base_weights, multipliers))
        causes.append(f"--base_weights merged into the transformer ({merged}; a merged LoRA with NaN or very large "
                      "values breaks every forward pass)")
    return causes


def _weight_rescaling(config: "TrainConfig", facts: NonFiniteFacts) -> list[str]:
    if facts.stage != "weights":
        return []
    causes = []
    options = config.optimizer
    if options.scale_weight_norms:
        causes.append(f"--scale_weight_norms {options.scale_weight_norms:g} rescales the LoRA after every step")
    optimizer = canonical_optimizer(options.optimizer_type)
    if options.max_grad_norm == 0 and optimizer != "Adafactor" and facts.loss is not None and math.isfinite(facts.loss):
        causes.append("gradient clipping is off (--max_grad_norm 0), so one large gradient reaches the weights whole")
    return causes


def _files(paths: tuple[str, ...]) -> str:
    names = [Path(p).name for p in paths[:4]]
    return ", ".join(names) + (" ..." if len(paths) > 4 else "") if names else "its files are not known"
