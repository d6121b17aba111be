"""Optimisation recipes that a config can choose for any method, beyond torch's own.

Every method takes ``optimizer`` and ``lr_scheduler`` as callables (in YAML a ``class_path`` and its
``init_args``); besides ``torch.optim.*`` those can be these, big_vision's recipe (Beyer et al. 2022,
``big_vision/utils.py``), which PatientConsistentKD uses by default::

    model:
      init_args:
        optimizer:
          class_path: distill.optim.DecoupledAdamW
          init_args: {lr: 0.003, weight_decay: 1.0e-4}
        lr_scheduler:
          class_path: distill.optim.WarmupCosine
          init_args: {warmup_steps: 1500}

:class:`WarmupCosine` steps once per optimiser step and learns the run's length from the Trainer, so a
shortened run (``--trainer.max_epochs 10``) still decays to 0 at its last step; :class:`CosineAnnealing` and
:class:`MultiStep` are torch's epoch-wise cosine and step decay with the same property.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Iterable

import lightning as L
import torch
from torch import nn

from distill.callbacks import optimizer_options, scale_learning_rates
from distill.errors import ConfigError


def warmup_cosine(warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """big_vision's schedule as a factor of the base rate: ``min(1, s/w) · ½(1 + cos(π·clip((s−w)/(T−w))))``.

    The rate is 0 at step 0 and reaches 0 again at ``total_steps`` (``None``: warm-up only) (big_vision
    ``utils.create_learning_rate_schedule`` with ``decay_type='cosine'``, ``linear_end=0``).
    """
    def factor(step: int) -> float:
        ramp = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
        if total_steps is None:
            return ramp
        progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up for ``warmup_steps`` optimiser steps, then cosine decay to 0 at ``total_steps``.

    Args:
        warmup_steps: steps of linear warm-up from 0 (official configs: 5,000 on ImageNet, 1,500 on the
            small data sets).
        total_steps: the step at which the rate reaches 0; ``None`` = the run's length, filled in by
            :meth:`distill.methods.DistillModule.configure_optimizers` from the Trainer (without a Trainer
            the schedule only warms up).
    """

    #: Stepped every optimiser step, whatever the method's ``lr_scheduler_interval`` says.
    interval = "step"

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None = None,
                 last_epoch: int = -1) -> None:
        if warmup_steps < 0:
            raise ConfigError(f"WarmupCosine warmup_steps={warmup_steps} must be >= 0.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def needs_run_length(self) -> bool:
        return self.total_steps is None

    def set_run_length(self, total_steps: int) -> None:
        """The run's (or stage's) length in optimiser steps (once, before the first step)."""
        if self.warmup_steps > total_steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps} exceeds the run's {total_steps} optimiser steps; "
                              "lower warmup_steps or train longer.")
        self.total_steps = total_steps

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.warmup_steps, self.total_steps)(self.last_epoch)
        return [base * factor for base in self.base_lrs]


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1.0)


class OneCycle(torch.optim.lr_scheduler.LRScheduler):
    """Smith & Topin's one-cycle schedule, as torch's ``OneCycleLR`` (cosine phases, two of them) computes it,
    stepped every optimiser step, whose length follows the run (``--trainer.max_epochs`` shortens the cycle).

    The rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of the steps, then falls
    to ``max_lr / (div_factor · final_div_factor)`` at the last step; with ``cycle_momentum`` the momentum (SGD's
    ``momentum``, Adam's β₁) falls from ``max_momentum`` to ``base_momentum`` and rises back, mirrored.

    Args:
        max_lr: the peak rate; ``None`` = the optimiser's ``lr`` (so that ``LRScaling`` scales it).
        total_steps: ``None`` = the run's (a staged method's: the stage's) optimiser steps, filled in by
            :meth:`distill.methods.DistillModule.configure_optimizers`.
        pct_start, div_factor, final_div_factor, cycle_momentum, base_momentum, max_momentum: ``OneCycleLR``'s,
            with its defaults.
    """

    interval = "step"

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float | None = None, total_steps: int | None = None,
                 pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
                 cycle_momentum: bool = True, base_momentum: float = 0.85, max_momentum: float = 0.95,
                 last_epoch: int = -1) -> None:
        if not 0 < pct_start < 1:
            raise ConfigError(f"OneCycle pct_start={pct_start} must be in (0, 1).")
        self.pct_start, self.total_steps = pct_start, total_steps
        self.cycle_momentum, self.momenta = cycle_momentum, (max_momentum, base_momentum)
        for group in optimizer.param_groups:
            peak = max_lr if max_lr is not None else group["lr"]
            group["initial_lr"] = peak / div_factor
            group["max_lr"], group["min_lr"] = peak, peak / div_factor / final_div_factor
            if cycle_momentum:
                if "momentum" not in group and "betas" not in group:
                    raise ConfigError("OneCycle cycle_momentum needs an optimiser with momentum (SGD) or betas (Adam); "
                                      "set cycle_momentum: false.")
                self._set_momentum(group, max_momentum)
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _set_momentum(group: dict[str, Any], value: float) -> None:
        if "betas" in group:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def needs_run_length(self) -> bool:
        return self.total_steps is None

    def set_run_length(self, total_steps: int) -> None:
        """The run's (or stage's) length in optimiser steps (once, before the first step): the rate (and momentum)
        of the current step are set again for it."""
        self.total_steps = total_steps
        for group, rate in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = rate
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _phase(self) -> tuple[int, float]:
        """(phase 0 rising or 1 falling, progress within it) at the current step, as OneCycleLR's two phases."""
        total = self.total_steps or 1
        rise_end = float(self.pct_start * total) - 1
        step = self.last_epoch
        if step <= rise_end:
            return 0, step / rise_end if rise_end > 0 else 1.0
        return 1, (step - rise_end) / max(total - 1 - rise_end, 1e-12)

    def get_lr(self) -> list[float]:
        phase, progress = self._phase()
        rates = []
        for group in self.optimizer.param_groups:
            start, end = (group["initial_lr"], group["max_lr"]) if phase == 0 else (group["max_lr"], group["min_lr"])
            rates.append(_cosine_between(start, end, progress))
            if self.cycle_momentum:
                high, low = self.momenta
                self._set_momentum(group, _cosine_between(*((high, low) if phase == 0 else (low, high)), progress))
        return rates


def scaled_epoch(epoch: int, run_epochs: int, of_epochs: int) -> int:
    """An epoch number of a recipe written for ``of_epochs`` epochs, in a run of ``run_epochs``: rounded, half up."""
    return math.floor(epoch * run_epochs / of_epochs + 0.5)


def _check_of_epochs(name: str, of_epochs: int | None) -> None:
    if of_epochs is not None and of_epochs < 1:
        raise ConfigError(f"{name} of_epochs={of_epochs} must be a positive number of epochs (the run's length its "
                          "epoch numbers are written for), or null.")


class CosineAnnealing(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's ``CosineAnnealingLR`` (stepped per epoch) whose length follows the run, so a run shortened with
    ``--trainer.max_epochs`` (or shorter ``stage_epochs``) still decays as its recipe says.

    ``T_max`` null: the run's length in epochs (a staged method's: the stage's). ``T_max`` given with
    ``of_epochs``: a recipe's ``T_max`` for a run of ``of_epochs`` epochs (a staged method's: for a first stage of
    ``of_epochs``), scaled by the run's (first stage's) epochs / ``of_epochs``, the same factor in every stage.
    ``T_max`` given alone: ``CosineAnnealingLR`` exactly, whatever the run's length.

    Args:
        T_max: epochs of the half cosine, or ``None``; filled in by
            :meth:`distill.methods.DistillModule.configure_optimizers`.
        eta_min: the rate at the end.
        of_epochs: the run (first stage) length ``T_max`` is written for (e.g. ``T_max: 8, of_epochs: 8`` with
            ``stage_epochs: [8, 4]``: the second stage runs the first half of the cosine, also when shortened).
    """

    interval = "epoch"

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int | None = None, eta_min: float = 0.0,
                 last_epoch: int = -1, of_epochs: int | None = None) -> None:
        if T_max is not None and T_max < 1:
            raise ConfigError(f"CosineAnnealing T_max={T_max} must be a positive number of epochs, or null.")
        _check_of_epochs("CosineAnnealing", of_epochs)
        if of_epochs is not None and T_max is None:
            raise ConfigError("CosineAnnealing of_epochs scales a given T_max; with T_max null the cosine spans the "
                              "run (or stage) already: drop of_epochs, or give T_max.")
        self._given_t_max, self.of_epochs = T_max, of_epochs
        # epoch 0 is the base rate whatever T_max is; the run's length arrives before the first step
        super().__init__(optimizer, T_max=T_max or 1, eta_min=eta_min, last_epoch=last_epoch)

    def needs_run_length(self) -> bool:
        return self._given_t_max is None

    def set_run_length(self, epochs: int) -> None:
        self.T_max = epochs

    def scales_with_run(self) -> bool:
        return self.of_epochs is not None

    def scale_to_run(self, first_span_epochs: int) -> None:
        """The run's (a staged method's first stage's) epochs, once per stage, before its first step."""
        self.T_max = max(1, scaled_epoch(self._given_t_max, first_span_epochs, self.of_epochs))


class MultiStep(torch.optim.lr_scheduler.MultiStepLR):
    """torch's ``MultiStepLR`` (stepped per epoch) whose milestones follow the run's length: the recipe's
    milestones for a run of ``of_epochs`` epochs (a staged method's: for a first stage of ``of_epochs``, the
    schedule restarting each stage), each scaled by the run's (first stage's) epochs / ``of_epochs`` and rounded.
    A run of ``of_epochs`` epochs is ``MultiStepLR`` exactly; a run shortened to a tenth decays at the same
    fractions of it. ``of_epochs`` null: ``MultiStepLR`` whatever the run's length.

    Args:
        milestones: epochs (of a stage, for staged methods, whose schedule restarts each stage) at which the
            rate is multiplied by ``gamma``, as the recipe gives them.
        gamma: the factor.
        of_epochs: the run (first stage) length the milestones are written for (RepDistiller's CIFAR recipe:
            ``milestones: [150, 180, 210], of_epochs: 240``; TAKD's paper, 150-epoch stages: ``[80, 120]``, ``150``).
    """

    interval = "epoch"

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.1,
                 of_epochs: int | None = None, last_epoch: int = -1) -> None:
        _check_of_epochs("MultiStep", of_epochs)
        self.recipe_milestones, self.of_epochs = list(milestones), of_epochs
        super().__init__(optimizer, milestones=milestones, gamma=gamma, last_epoch=last_epoch)

    def scales_with_run(self) -> bool:
        return self.of_epochs is not None

    def scale_to_run(self, first_span_epochs: int) -> None:
        """The run's (a staged method's first stage's) epochs, once per stage, before its first step."""
        self.milestones = Counter(scaled_epoch(m, first_span_epochs, self.of_epochs) for m in self.recipe_milestones)


def decay_groups(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, rest)``: tensors of two or more dimensions (conv kernels, linear weights) decay;
    norms' scales and shifts and all biases (one dimension) do not — big_vision's default
    ``wd_mults = [('.*/kernel$', 1.0)]``."""
    params = [p for p in params if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


class DecoupledAdamW(torch.optim.AdamW):
    """Adam with big_vision's decoupled weight decay, on weights only (:func:`decay_groups`).

    big_vision's update is ``−sched(t)·(lr·adam(g) + wd·θ)``: the decay is scaled by the schedule factor but
    **not** by the base rate. torch's ``AdamW`` subtracts ``lr_t·λ·θ`` with ``lr_t = lr·sched(t)``, so each
    step sets ``λ = weight_decay / lr`` with ``lr`` the group's base rate (after any ``LRScaling``, so that
    scaling the rate leaves the decay alone), which reproduces big_vision's update exactly.

    Args:
        params: the parameters (a flat iterable; they are split into decaying and not here).
        lr: Adam's base learning rate.
        weight_decay: big_vision's ``wd``, the decay per step at schedule factor 1.
        betas, eps: Adam's, default as big_vision's ``scale_by_adam`` (optax defaults).
        foreach, fused: torch's implementation choices (the same update; ``fused``: one kernel per step).
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.003, weight_decay: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        if not lr > 0 or weight_decay < 0:
            raise ConfigError(f"DecoupledAdamW needs lr > 0 and weight_decay >= 0; got lr={lr}, "
                              f"weight_decay={weight_decay}.")
        weights, rest = decay_groups(params)
        super().__init__([{"params": weights, "decoupled_wd": weight_decay}, {"params": rest, "decoupled_wd": 0.0}],
                         lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach, fused=fused)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            base_lr = group.get("initial_lr", group["lr"])  # schedulers record the base rate as initial_lr
            group["weight_decay"] = group["decoupled_wd"] / base_lr
        return super().step(closure)


def lightning_optimization(params: list[nn.Parameter], optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                           lr_scheduler: Callable[[torch.optim.Optimizer], Any], trainer: L.Trainer | None,
                           interval: str, run_length: Callable[[str], int],
                           first_span_epochs: Callable[[], int] | None = None) -> Any:
    """What ``configure_optimizers`` returns: the optimiser built from ``optimizer``, its learning rates scaled
    by the Trainer's :class:`~distill.callbacks.LRScaling` (before the scheduler exists, so that it takes the
    scaled rate as its base rate), and the schedule, told the run's length in its own unit if it asks for it
    (:class:`WarmupCosine`: steps, :class:`CosineAnnealing`: epochs; ``run_length("step" | "epoch")``), or
    scaled to the epochs of the run's first schedule span if it was written for another length
    (:class:`MultiStep`, :class:`CosineAnnealing` with ``of_epochs``; ``first_span_epochs()``). The Trainer's
    :class:`~distill.callbacks.SpeedOptions` may add constructor arguments (``fused=True``)."""
    options = optimizer_options(trainer)
    try:
        built = optimizer(params, **options)
    except TypeError as error:
        if not any(f"'{name}'" in str(error) for name in options):
            raise
        raise ConfigError(f"SpeedOptions(fused_optimizer=true) builds the optimiser with fused=True, which it does "
                          f"not take ({error}); torch's SGD, Adam, AdamW and Adagrad and distill.optim.DecoupledAdamW "
                          "do: choose one of them, or set fused_optimizer: false.") from error
    scale_learning_rates(trainer, built)
    scheduler = lr_scheduler(built)
    if scheduler is None:
        return built
    interval = getattr(scheduler, "interval", interval)
    if trainer is not None and getattr(scheduler, "needs_run_length", lambda: False)():
        scheduler.set_run_length(run_length(interval))
    if trainer is not None and first_span_epochs is not None and getattr(scheduler, "scales_with_run", lambda: False)():
        scheduler.scale_to_run(first_span_epochs())
    config = {"scheduler": scheduler, "interval": interval}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = "val/acc"
    return {"optimizer": built, "lr_scheduler": config}


__all__ = ["lightning_optimization", "warmup_cosine", "WarmupCosine", "OneCycle", "CosineAnnealing", "MultiStep", "scaled_epoch", "decay_groups", "DecoupledAdamW"]
