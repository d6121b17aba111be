"""What staged methods share: stages of given lengths in one ``fit``, each with a fresh optimiser.

A staged method (TeacherAssistantKD, ResidualKD) sets ``stage_ends`` (cumulative epochs) and implements
``_enter_stage(index)`` (what trains, what is frozen) and ``_finish_stage()`` (keep the stage's best
weights, record them). This class switches stages at epoch boundaries, rebuilds the optimiser and
schedule per stage (a schedule's epochs count from its stage's start), stops after the last stage and
keeps ``last.ckpt`` and the newest epoch's checkpoint for Lightning (model selection happens per stage
inside the method).
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from distill.errors import ConfigError
from distill.lightning_private import rewrap_ddp
from distill.methods.base import DistillModule, EpochCheckpoint


class StagedModule(DistillModule):
    """Base of methods that train in stages; see the module docstring.

    Subclasses keep ``stage``, ``stage_ends``, ``stage_records`` (what results.json reports per stage) and
    the current stage's best validation score and weights (``_best_score``, ``_best_state``); these go
    into checkpoints under ``STATE_KEY`` so that a run resumes in the middle of any stage.
    """

    STATE_KEY = "staged"
    stage: int
    stage_ends: list[int]
    stage_records: Any

    @property
    def total_epochs(self) -> int:
        return self.stage_ends[-1]

    def _stage_for_epoch(self, epoch: int) -> int:
        """The stage that trains at ``epoch`` (the last stage past the end)."""
        return next((i for i, end in enumerate(self.stage_ends) if epoch < end), len(self.stage_ends) - 1)

    def _enter_stage(self, index: int) -> None:
        raise NotImplementedError

    def _finish_stage(self) -> None:
        raise NotImplementedError

    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs < self.total_epochs:
            raise ConfigError(f"trainer.max_epochs = {max_epochs} is less than sum(stage_epochs) = "
                              f"{self.total_epochs}; set trainer.max_epochs to {self.total_epochs}.")

    def on_train_epoch_start(self) -> None:
        stage = self._stage_for_epoch(self.current_epoch)
        if stage != self.stage:
            self._finish_stage()
            self._enter_stage(stage)
            self._restart_optimisation()
        super().on_train_epoch_start()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.current_epoch + 1 >= self.total_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # Only a completed run finishes its last stage; a run stopped early resumes from its checkpoint.
        if self.current_epoch >= self.total_epochs:
            self._finish_stage()

    def on_fit_end(self) -> None:
        self.on_train_end()  # a run resumed from its final checkpoint trains nothing and has no train end

    def _restart_optimisation(self) -> None:
        """A fresh optimiser and schedule for the new stage (and a DDP wrapper that sees its parameters)."""
        strategy = self.trainer.strategy
        strategy.setup_optimizers(self.trainer)
        if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
            # DDP fixes the set of parameters it synchronises when it wraps the module: wrap again.
            rewrap_ddp(strategy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.STATE_KEY] = {"stage": self.stage, "best_score": self._best_score,
                                      "best_state": self._best_state, "records": copy.deepcopy(self.stage_records),
                                      **self._extra_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint[self.STATE_KEY]
        self._enter_stage(saved["stage"])
        self._best_score, self._best_state = saved["best_score"], saved["best_state"]
        self.stage_records = saved["records"]
        self._load_extra_state(saved)

    def _extra_state(self) -> dict[str, Any]:
        """More of the method's stage state for checkpoints."""
        return {}

    def _load_extra_state(self, saved: dict[str, Any]) -> None:
        pass

    def checkpoint_callback(self) -> ModelCheckpoint:
        # Model selection happens per stage inside the module. Lightning (2.6) writes last.ckpt only
        # when it also writes a regular checkpoint, so keep the newest epoch's (save_top_k=1 without a
        # monitor); with save_top_k=0 a killed run had no checkpoint to resume from.
        return EpochCheckpoint(monitor=None, save_last=True, save_top_k=1, filename="epoch{epoch:03d}",
                               auto_insert_metric_name=False)


__all__ = ["StagedModule"]
