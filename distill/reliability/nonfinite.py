"""Non-finite training losses: one decision per step that every process shares, and the error that names it."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from torch import Tensor

from distill.errors import NonFiniteLossError

# Returning None from training_step is how `nonfinite_loss = "skip"` skips a batch.
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")


def all_finite(loss: Tensor, trainer: L.Trainer | None) -> bool:
    """Whether the step's total loss is finite, on every process (under DDP they must skip or stop together)."""
    finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
    if trainer is not None and trainer.world_size > 1:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    return finite


def nonfinite_loss_error(losses: dict[str, Tensor], trainer: L.Trainer | None, prefix: str, global_step: int,
                         epoch: int, batch_idx: int) -> NonFiniteLossError:
    """The error that stops a run at a non-finite loss: the step, the loss parts that are not finite and the
    last good checkpoint, which stays as it was."""
    bad = {name: value.detach().float().mean().item() for name, value in losses.items()
           if not torch.isfinite(value.detach()).all()}
    parts = [name for name in bad if name != "loss"] or list(bad) or ["loss (on another process)"]
    checkpoint = trainer.checkpoint_callback if trainer is not None else None
    last = getattr(checkpoint, "last_model_path", "") or "none written yet"
    described = ", ".join(f"{prefix}{name} = {bad.get(name, 'non-finite')}" for name in parts)
    return NonFiniteLossError(
        f"non-finite training loss at global step {global_step} (epoch {epoch}, batch {batch_idx}): {described}. "
        f"The last good checkpoint is kept ({last}). Lower the learning rate or check the data; "
        "`--nonfinite_loss skip` skips such batches instead.")


__all__ = ["all_finite", "nonfinite_loss_error"]
