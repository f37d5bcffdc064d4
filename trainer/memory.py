"""Block runners: how the FLUX transformer runs each of its blocks.

`Flux.forward` hands every block to `flux.block_runner(kind, index, block, *args)`, so memory strategies (activation
checkpointing now; block swap, CPU-offloaded checkpointing, per-block compile later) plug in here without editing the
model. `runner_for` maps the training options to a runner and `install` puts it on a model.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models.flux import Flux


class BlockRunner(Protocol):
    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        """Run `block(*args)`; kind is "double" or "single", index the block's position in its list."""


class PlainRunner:
    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        return block(*args)


class CheckpointedRunner:
    """Keeps only each block's inputs and recomputes its activations in backward; plain when nothing will
    backpropagate (eval or no_grad), where checkpointing would only cost time."""

    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        if block.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def runner_for(gradient_checkpointing: bool, cpu_offload_checkpointing: bool = False,
               blocks_to_swap: int | None = None) -> BlockRunner:
    if cpu_offload_checkpointing:
        raise NotImplementedError("cpu_offload_checkpointing: offloading checkpointed activations to CPU has not "
                                  "landed yet")
    if blocks_to_swap:
        raise NotImplementedError(f"blocks_to_swap={blocks_to_swap}: swapping transformer blocks to CPU has not "
                                  "landed yet")
    return CheckpointedRunner() if gradient_checkpointing else PlainRunner()


def install(flux: Flux, runner: BlockRunner | None) -> None:
    """Make `runner` run every block of `flux`; None restores the model's own `gradient_checkpointing` switch."""
    if isinstance(runner, nn.Module):
        # nn.Module.__setattr__ would register it as a submodule: saved in state_dict, moved by .to().
        raise TypeError(f"a block runner must not be an nn.Module (got {type(runner).__name__})")
    flux.block_runner = runner
