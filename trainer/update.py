"""One optimizer update from the accumulated gradients: the backward pass (with fp16 loss scaling), the step's one
read from the device, clipping, the optimizer and its schedule, the max-norm cap, and the checks that nothing
non-finite is ever applied or saved (--skip_nonfinite_steps)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import oom
from .errors import NonFiniteError
from .events import Message, Reporter
from .lora.max_norm import CappedNorms, MaxNormResult, cap_weight_norms
from .nonfinite_diagnosis import NonFiniteFacts
from .nonfinite_diagnosis import describe as describe_nonfinite
from .step_checks import all_finite, gradient_norm, read_back


class Fp16GradScaler(torch.amp.GradScaler):
    """--full_fp16: the LoRA weights themselves are fp16, so their gradients are too; the stock scaler refuses to
    unscale fp16 gradients, sd-scripts' patch lets it (allow_fp16), and so does this."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


class Updater:
    """The optimizer side of a training step for the session's network; `where` marks the optimizer step (a step
    cut short there leaves half-updated weights, which are never saved)."""

    def __init__(self, session, reporter: Reporter, where: oom.Where):
        self.session = session
        self.config = session.config
        self.reporter = reporter
        self.where = where
        self.scaler = None
        if self.config.memory.mixed_precision == "fp16":
            scaler = Fp16GradScaler if self.config.memory.full_fp16 else torch.amp.GradScaler
            self.scaler = scaler(session.device.type)
        self.nonfinite_steps = 0
        self.max_norm: MaxNormResult | None = None
        self._gradient_norm: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def apply(self, losses: list[torch.Tensor], step: int) -> tuple[float, bool]:
        """Optimizer step `step` (1-based) from the gradients of `losses` (its micro-batches): (their mean loss,
        whether it was applied). Not applied when the loss or gradients are not finite (skip it with `skip`)."""
        total, finite = self._read(losses)
        loss = total / len(losses)
        if finite:
            self._check_weights_finite(loss, self._optimizer_step(), step)
        return loss, finite

    def _read(self, losses: list[torch.Tensor]) -> tuple[float, bool]:
        """The step's one read from the device: the sum of its micro-batch losses, and whether they and the
        gradients are finite on every process (with fp16 loss scaling an overflow is the scaler's to handle: it
        skips that step and lowers the scale). The gradients' norm is kept for clipping."""
        self._gradient_norm = gradient_norm(self.session.optimizer) if self.scaler is None else None
        *values, norm = read_back([*losses, self._gradient_norm])
        total = sum(values)
        finite = math.isfinite(total) and (norm is None or math.isfinite(norm))
        return total, not self.session.world.any(not finite, self.session.device)

    def _check_weights_finite(self, loss: float, capped: CappedNorms | None, step: int) -> None:
        """The optimizer step's one read: whether the LoRA weights are finite, and the max-norm figures."""
        flag = all_finite(list(self.session.network.parameters()))
        finite, figures = read_back([flag, capped.values() if capped is not None else None])
        if figures is not None:
            self.max_norm = MaxNormResult.from_values(figures)
        if finite is not None and not finite:
            causes = describe_nonfinite(self.config, NonFiniteFacts("weights", loss))
            raise NonFiniteError(f"step {step}: the LoRA weights became NaN or infinite in the optimizer step (loss "
                                 f"{loss:.4g}). {causes} Training stopped; the files saved before are kept.")

    def skip(self, loss: float, paths: list, step: int) -> None:
        """Skip step `step`, whose loss or gradients are not finite, while the --skip_nonfinite_steps budget lasts,
        else stop the run: nothing non-finite is ever applied or saved, so the files written so far stay good."""
        self.session.optimizer.zero_grad(set_to_none=True)
        budget = self.config.run.skip_nonfinite_steps
        self.nonfinite_steps += 1
        files = ", ".join(Path(p).name for p in paths[:4]) + (" ..." if len(paths) > 4 else "")
        what = (f"step {step}: the loss is {loss}" if not math.isfinite(loss)
                else f"step {step}: the gradients hold NaN or infinite values (loss {loss:.4g})")
        if self.nonfinite_steps <= budget:
            self.reporter.emit(Message(f"{what}; step skipped ({self.nonfinite_steps} of --skip_nonfinite_steps "
                                       f"{budget}); batch: {files}", "warning"))
            return
        facts = NonFiniteFacts("gradients" if math.isfinite(loss) else "loss", loss, tuple(str(p) for p in paths))
        raise NonFiniteError(f"{what}. {describe_nonfinite(self.config, facts)} Training stopped; nothing non-finite "
                             "was saved, and the files saved before this step are kept. --skip_nonfinite_steps N "
                             "skips up to N such steps.")

    def _optimizer_step(self) -> CappedNorms | None:
        """Clip, step, schedule; the max-norm cap's figures stay on the device for `_check_weights_finite`."""
        s, options = self.session, self.config.optimizer
        params = [p for group in s.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(s.optimizer)
        if options.max_grad_norm > 0 and self._gradient_norm is not None:  # the norm `_read` computed
            torch.nn.utils.clip_grads_with_norm_(params, options.max_grad_norm, self._gradient_norm)
        elif options.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        s.network.update_ggpo_norms()  # GGPO reads the final gradients and the weights before the step
        self.where.optimizer_step = True  # from here until the step's end the weights and optimizer state change
        if self.scaler is not None:
            self.scaler.step(s.optimizer)
            self.scaler.update()
        else:
            s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        self._gradient_norm = None
        capped = cap_weight_norms(s.network, options.scale_weight_norms) if options.scale_weight_norms else None
        self.where.optimizer_step = False
        return capped
