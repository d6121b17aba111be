"""Non-finite training losses: found on the device, read on the host every few steps, and the error that names them.

Reading a loss on the host (``.item()``, ``bool(...)``) waits for the GPU to finish everything queued before it;
once per step that keeps a launch-bound step from ever running ahead of the device. So the steps' loss parts stay
on the device (:class:`StepLosses`) and are copied to the host in one transfer every :data:`READ_EVERY` steps, at
every step the loggers write, at the epoch's last step, before every checkpoint and at the end of training. A NaN
still stops the run naming the step and loss part it appeared in, at most :data:`READ_EVERY` steps later; the
weights of the steps in between are never saved, and the last good checkpoint stays as it was.

``nonfinite_loss = "skip"`` must decide before the backward pass, so it reads every step's loss at once (one
synchronisation per step, the price of skipping).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from distill.errors import NonFiniteLossError

# Returning None from training_step is how `nonfinite_loss = "skip"` skips a batch.
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")

#: Training steps whose losses may stay unread on the device: one host-device synchronisation per this many
#: steps (a NaN stops the run at most this many steps after it appeared).
READ_EVERY = 16


def all_finite(loss: Tensor, trainer: L.Trainer | None) -> bool:
    """Whether the step's total loss is finite, on every process (under DDP they must skip or stop together).
    Reads the loss on the host now: for ``nonfinite_loss = "skip"``, which must decide before the backward pass."""
    finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
    if trainer is not None and trainer.world_size > 1:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    return finite


@dataclass(frozen=True)
class StepPlace:
    """Where a training step ran, for the error that names it."""

    global_step: int
    epoch: int
    batch_idx: int
    prefix: str  # the method's log prefix then (a stage's "ta1/")
    names: tuple[str, ...]  # its loss parts, in the order of the recorded values


class StepLosses:
    """The training steps' loss parts, kept on the device until :meth:`read` copies them to the host at once."""

    def __init__(self) -> None:
        self._places: list[StepPlace] = []
        self._values: list[Tensor] = []

    def __len__(self) -> int:
        return len(self._places)

    def record(self, losses: dict[str, Tensor], prefix: str, global_step: int, epoch: int, batch_idx: int) -> None:
        """Keeps references to the step's loss parts (no device work, no synchronisation)."""
        self._places.append(StepPlace(global_step, epoch, batch_idx, prefix, tuple(losses)))
        self._values.extend(value.detach() for value in losses.values())

    def due(self) -> bool:
        return len(self._places) >= READ_EVERY

    def read(self, trainer: L.Trainer | None) -> dict[str, Tensor]:
        """Copies the pending steps' losses to the host in one transfer (the one synchronisation) and forgets them.

        Returns the latest step's loss parts as CPU tensors (for the loggers and the progress bar: Lightning
        then converts host tensors, which costs no synchronisation). Raises :class:`NonFiniteLossError` naming
        the first step whose total loss is not finite and its non-finite parts, on every process when any
        process has one (under DDP they must stop together; every process calls this at the same steps and
        hooks).
        """
        places, values = self._places, self._values
        self._places, self._values = [], []
        scalars = [value.float() if value.dim() == 0 else value.float().mean() for value in values]
        host = torch.stack(scalars).cpu() if scalars else torch.zeros(0)
        sizes = [len(place.names) for place in places]
        per_step = list(host.split(sizes)) if places else []
        # the total decides, as it does for skipping (a part that is only logged may be NaN without harm);
        # read from one Python list rather than one host tensor op per step
        flat, starts = host.tolist(), itertools.accumulate(sizes, initial=0)
        totals = [flat[start + place.names.index("loss")] for place, start in zip(places, starts)]
        finite = all(math.isfinite(total) for total in totals)
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            bad = next(((place, step) for place, step, total in zip(places, per_step, totals)
                        if not math.isfinite(total)), None)
            if bad is None:  # only another process saw it
                raise nonfinite_loss_error({}, trainer, "", *_latest(places, trainer))
            place, step = bad
            raise nonfinite_loss_error(dict(zip(place.names, step)), trainer, place.prefix, place.global_step,
                                       place.epoch, place.batch_idx)
        return dict(zip(places[-1].names, per_step[-1])) if places else {}


def _latest(places: list[StepPlace], trainer: L.Trainer | None) -> tuple[int, int, int]:
    if places:
        return places[-1].global_step, places[-1].epoch, places[-1].batch_idx
    return (trainer.global_step, trainer.current_epoch, -1) if trainer is not None else (-1, -1, -1)


class ReadPendingLosses(L.Callback):
    """Reads the steps' pending losses (:class:`StepLosses` of the module) before anything is decided from the
    weights: before every validation and checkpoint, and at the end of training. A checkpoint is therefore
    never written from weights a non-finite step has touched."""

    @staticmethod
    def _read(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = getattr(pl_module, "step_losses", None)
        if isinstance(losses, StepLosses):
            losses.read(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._read(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, pl_module)


def nonfinite_loss_error(losses: dict[str, Tensor], trainer: L.Trainer | None, prefix: str, global_step: int,
                         epoch: int, batch_idx: int) -> NonFiniteLossError:
    """The error that stops a run at a non-finite loss: the step, the loss parts that are not finite and the
    last good checkpoint, which stays as it was. ``losses`` empty: the loss was not finite on another process."""
    bad = {name: value.detach().float().mean().item() for name, value in losses.items()
           if not torch.isfinite(value.detach()).all()}
    parts = [name for name in bad if name != "loss"] or list(bad) or ["loss (on another process)"]
    checkpoint = trainer.checkpoint_callback if trainer is not None else None
    last = getattr(checkpoint, "last_model_path", "") or "none written yet"
    described = ", ".join(f"{prefix}{name} = {bad.get(name, 'non-finite')}" for name in parts)
    where = f"global step {global_step} (epoch {epoch}, batch {batch_idx})" if losses else \
        f"or before global step {global_step} (epoch {epoch})"
    return NonFiniteLossError(
        f"non-finite training loss at {where}: {described}. "
        f"The last good checkpoint is kept ({last}). Lower the learning rate or check the data; "
        "`--nonfinite_loss skip` skips such batches instead.")


__all__ = ["all_finite", "nonfinite_loss_error", "ReadPendingLosses", "READ_EVERY", "StepLosses"]
