"""Effective batch size and learning-rate scaling when a run is spread over several processes.

Under DDP every process (one per GPU, on every node) draws its own ``data.batch_size`` images per
step and the gradients are averaged, so one optimiser step sees the *global* batch::

    global_batch = data.batch_size × world_size × trainer.accumulate_grad_batches
    world_size   = trainer.devices × trainer.num_nodes

A recipe tuned at one batch size (RepDistiller's CIFAR-100 recipe: batch 64, lr 0.05) keeps its
learning rate when the same config runs on 8 GPUs, although each step now averages 8× more images.
Goyal et al. (2017, "Accurate, Large Minibatch SGD") scale the learning rate linearly with the
global batch, ``lr = lr_config × global_batch / base_batch_size``; :class:`LRScaling` does that::

    trainer:
      callbacks:
        - class_path: distill.scaling.LRScaling
          init_args: {rule: linear, base_batch_size: 64}   # the batch the config's lr was tuned for

or on the command line ``--trainer.callbacks+=distill.scaling.LRScaling
--trainer.callbacks.base_batch_size=64``.

Why a Trainer callback rather than a constructor argument of the methods: it is a property of how a
run is launched, not of the method, and a callback reaches every method (present and future) without
each method repeating the argument in its signature. The scaling itself happens in
:meth:`distill.methods.DistillModule.configure_optimizers` through :func:`scale_learning_rates`,
after the optimiser is built and *before* the learning-rate scheduler is, so schedulers take the
scaled rate as their base rate (cosine and step schedules then decay from it) and resuming from a
checkpoint restores a consistent optimiser and scheduler state.

Goyal et al. also warm the rate up over the first epochs for large batches; add a warm-up schedule
in the config (e.g. ``torch.optim.lr_scheduler.LinearLR``) if the scaled rate is large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from distill.errors import ConfigError

RULES = ("none", "linear")


@dataclass(frozen=True)
class GlobalBatch:
    """How one optimiser step's batch is made up."""

    per_process: int
    world_size: int
    accumulate: int

    @property
    def size(self) -> int:
        return self.per_process * self.world_size * self.accumulate

    def __str__(self) -> str:
        return (f"{self.size} = {self.per_process} per process × {self.world_size} "
                f"process{'es' if self.world_size != 1 else ''} × {self.accumulate} accumulated")


def per_process_batch_size(trainer: L.Trainer) -> int:
    """``data.batch_size``: read from the DataModule because the dataloaders do not exist yet when the
    optimiser is configured."""
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("LRScaling needs the per-process batch size: fit with a DataModule that has an "
                          "integer `batch_size` (distill's DistillDataModule does).")
    return batch_size


def global_batch(trainer: L.Trainer, per_process: int | None = None) -> GlobalBatch:
    """The global batch as this ``trainer`` will run it (``world_size`` counts every node's processes)."""
    return GlobalBatch(
        per_process=per_process if per_process is not None else per_process_batch_size(trainer),
        world_size=int(trainer.world_size),
        accumulate=int(trainer.accumulate_grad_batches),
    )


def lr_factor(rule: str, batch: int, base_batch_size: int) -> float:
    """The factor every learning rate is multiplied by: ``batch / base_batch_size`` for ``linear``."""
    if rule == "none":
        return 1.0
    if rule == "linear":
        return batch / base_batch_size
    raise ConfigError(f"lr scaling rule must be one of {', '.join(RULES)}, got {rule!r}")


class LRScaling(Callback):
    """Scales every parameter group's learning rate with the global batch size (see module docstring).

    Args:
        rule: ``"linear"`` (Goyal et al. 2017) or ``"none"`` (only report the global batch).
        base_batch_size: the global batch size the configured learning rate was tuned for. 256 is
            Goyal et al.'s reference; set it to the config's own ``data.batch_size`` so that one process
            keeps the config's rate and N processes get N times it.
        verbose: print the resolved global batch and learning rates once at fit start (global rank 0).
    """

    def __init__(self, rule: str = "linear", base_batch_size: int = 256, verbose: bool = True) -> None:
        if rule not in RULES:
            raise ConfigError(f"LRScaling rule must be one of {', '.join(RULES)}, got {rule!r}")
        if not isinstance(base_batch_size, int) or base_batch_size < 1:
            raise ConfigError(f"LRScaling base_batch_size must be a positive integer, got {base_batch_size!r}")
        self.rule = rule
        self.base_batch_size = base_batch_size
        self.verbose = verbose
        #: filled by :func:`scale_learning_rates`: what was resolved for the current fit
        self.resolved: dict[str, Any] | None = None

    def scale(self, trainer: L.Trainer, optimizer: Optimizer) -> dict[str, Any]:
        batch = global_batch(trainer)
        factor = lr_factor(self.rule, batch.size, self.base_batch_size)
        configured = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        self.resolved = {
            "global_batch_size": batch.size,
            "per_process_batch_size": batch.per_process,
            "world_size": batch.world_size,
            "accumulate_grad_batches": batch.accumulate,
            "rule": self.rule,
            "base_batch_size": self.base_batch_size,
            "lr_factor": factor,
            "configured_lr": configured,
            "lr": [group["lr"] for group in optimizer.param_groups],
        }
        return self.resolved

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.resolved is None:
            # The module did not call scale_learning_rates (not a DistillModule, or it overrides
            # configure_optimizers): better to stop than to train silently at the wrong rate.
            raise ConfigError(f"LRScaling works with distill's methods only; {type(pl_module).__name__} "
                              "does not apply it in configure_optimizers.")
        if self.verbose and trainer.is_global_zero:
            print(describe(self.resolved), flush=True)


def describe(resolved: dict[str, Any]) -> str:
    """One line: the global batch and the learning rates before and after scaling."""
    batch = GlobalBatch(resolved["per_process_batch_size"], resolved["world_size"],
                        resolved["accumulate_grad_batches"])
    lrs = ", ".join(f"{a:g} → {b:g}" for a, b in zip(resolved["configured_lr"], resolved["lr"]))
    how = (f"{resolved['rule']} scaling, ×{resolved['lr_factor']:g} = {batch.size}/{resolved['base_batch_size']}"
           if resolved["rule"] != "none" else "no scaling")
    return f"LRScaling: global batch {batch}; lr {lrs} ({how})"


def scale_learning_rates(trainer: L.Trainer | None, optimizer: Optimizer) -> dict[str, Any] | None:
    """Applies the trainer's :class:`LRScaling` callback to ``optimizer``, if it has one.

    Called by :meth:`DistillModule.configure_optimizers` between building the optimiser and the
    scheduler. Without a trainer (a module used on its own) or without the callback it does nothing.
    """
    if trainer is None:
        return None
    callback = next((c for c in trainer.callbacks if isinstance(c, LRScaling)), None)
    return callback.scale(trainer, optimizer) if callback is not None else None


__all__ = ["GlobalBatch", "LRScaling", "global_batch", "lr_factor", "scale_learning_rates", "describe"]
