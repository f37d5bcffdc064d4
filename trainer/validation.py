"""Validation loss on the images `validation_split` holds out (sd-scripts' --validation_split, --validation_seed,
--validate_every_n_steps, --validate_every_n_epochs, --max_validation_steps; train_network.py).

Each validation batch is evaluated at four fixed sigmas, 0.2, 0.4, 0.6 and 0.8 (sd-scripts' validation timesteps
linspace(0, 1000, 6)[1:-1] = 200, 400, 600, 800, over 1000), with noise drawn from the validation seed (the training
seed when none is given), so the value is comparable from one validation to the next: the same weights give the same
loss. sd-scripts means to do exactly this; its FLUX path, though, does not read the fixed timesteps (its
get_noisy_model_input_and_timesteps ignores min/max_timestep) and draws four random sigmas per batch from the
re-seeded RNG instead. The loss is `step.loss` itself (noise, noising, prediction type, loss type, weighting, alpha
masks), run with the network and transformer in eval mode, without gradients, and inside a fork of the random states
so training randomness is untouched: a run with validation trains the same LoRA as one without.

The value is the mean over (batch, sigma) of each batch's loss, over at most `max_validation_steps` batches, as
sd-scripts averages its per-batch losses. sd-scripts validates after every `validate_every_n_steps` optimizer steps,
and at the end of every epoch (every `validate_every_n_epochs`-th epoch when that is given; by default every epoch),
the last, possibly partial, epoch included. It logs `loss/validation/step_average` and
`loss/validation/step_divergence` (validation minus the training moving average) at the step, and
`loss/validation/epoch_average` and `loss/validation/epoch_divergence` at the epoch's end.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from . import step as step_module
from .cadence import ValidationSchedule  # when to validate: the loop's cadence (cadence.py)
from .data import DatasetGroup
from .step import StepContext

# sd-scripts: NUM_VALIDATION_TIMESTEPS = 4; np.linspace(0, 1000, 6, dtype=int)[1:-1] -> 200, 400, 600, 800
VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)


class Validator:
    """Mean loss over the validation datasets at fixed sigmas and noise. `part` = (rank, world size): each process
    computes its slice of every batch and the mean is gathered over the processes."""

    def __init__(self, context: StepContext, datasets: DatasetGroup, seed: int, max_steps: int | None = None,
                 part: tuple[int, int] = (0, 1), sigmas: tuple[float, ...] = VALIDATION_SIGMAS):
        self.datasets = datasets
        self.seed = seed
        self.part = part
        self.steps = len(datasets) if max_steps is None else min(max_steps, len(datasets))
        # the encoders' own LoRA (when trained) still applies: encoded now, just without gradients through T5
        self.context = replace(context, seed=seed, train_t5=False)
        self.sigmas = tuple(sigmas)

    @classmethod
    def from_session(cls, session, context: StepContext | None = None) -> Validator | None:
        """The validator of a prepared session, or None when nothing is held out (no validation_split, or too few
        images). Reads `session.validation_datasets` (a DatasetGroup or None, cached like the training datasets);
        `context` is the loop's StepContext (built from the session when not given)."""
        datasets = getattr(session, "validation_datasets", None)
        if datasets is None or len(datasets) == 0:
            return None
        config = session.config
        if context is None:
            context = StepContext(
                flux=session.flux, network=session.network, flow=config.flow, seed=session.seed,
                weight_dtype=session.weight_dtype, device=session.device,
                apply_t5_attn_mask=config.models.apply_t5_attn_mask, ae=session.ae, clip_l=session.clip_l,
                t5=session.t5, train_clip=session.train_clip, train_t5=session.train_t5)
        seed = config.data.validation_seed if config.data.validation_seed is not None else session.seed
        part = (session.world.rank, session.world.size)
        return cls(context, datasets, seed, config.validation.max_validation_steps, part)

    def loss(self) -> float:
        """The mean validation loss at the current weights; leaves random states and train/eval modes as found."""
        ctx = self.context
        modules = [m for m in (ctx.flux, ctx.network, ctx.clip_l, ctx.t5) if isinstance(m, torch.nn.Module)]
        # every submodule's own mode: a wrapper may say "training" around a model kept in eval (a T5 with dropout)
        modes = [(sub, sub.training) for m in modules for sub in m.modules()]
        cuda = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
        python_state, numpy_state = random.getstate(), np.random.get_state()
        total, count = 0.0, 0
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.manual_seed(self.seed)  # as sd-scripts' switch_rng_state: anything global is seeded too
                random.seed(self.seed)
                for m in modules:
                    m.eval()
                for index in range(self.steps):
                    batch = self.datasets.batch(index, part=self.part)
                    for k, sigma in enumerate(self.sigmas):
                        value = step_module.loss(ctx, batch, index * len(self.sigmas) + k, sigma=sigma)
                        total += float(value.detach().float().item())
                        count += 1
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            for sub, mode in modes:
                sub.training = mode
        total = self._gathered(total)
        return total / count if count else float("nan")

    def _gathered(self, total: float) -> float:
        """The sum over processes divided by their number: each slice's loss is already scaled so that this mean
        is the whole batch's (Batch.loss_scale)."""
        rank, world = self.part
        if world <= 1:
            return total
        import torch.distributed as dist

        value = torch.tensor([total], dtype=torch.float64, device=self.context.device)
        dist.all_reduce(value)
        return float(value.item()) / world


__all__ = ["Validator", "ValidationSchedule", "VALIDATION_SIGMAS"]
