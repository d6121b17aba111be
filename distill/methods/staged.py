"""What staged methods share: stages of given lengths in one ``fit``, each with its own trained and frozen
networks, a fresh optimiser, and its best-validation weights kept.

A staged method (TeacherAssistantKD, ResidualKD) sets ``stage_ends`` (cumulative epochs) and
``stage_records`` (what results.json reports per stage), and says per stage what trains
(:meth:`~distill.methods.DistillModule.trainable_modules`), what is frozen (:meth:`frozen_modules`), how
the stage is scored and what its weights are (:meth:`stage_score`, :meth:`trained_state`) and what is
recorded when it ends (:meth:`record_stage`). This class:

* switches stages at epoch boundaries; the frozen networks get no gradients and stay in eval mode;
* keeps the stage's best-validation weights and, when the stage ends, loads them (the next stage starts
  from them) before :meth:`record_stage`;
* rebuilds the optimiser and schedule per stage (a schedule's epochs count from its stage's start) and
  re-wraps DDP, which fixes the parameters it synchronises when it wraps;
* stops after the last stage, and keeps ``last.ckpt`` and the newest epoch's checkpoint for Lightning
  (model selection happens per stage, here); checkpoints carry the stage state, so a run resumes in
  the middle of any stage.
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.lightning_private import rewrap_ddp
from distill.methods.teacher_student import TeacherStudentModule


class StagedModule(TeacherStudentModule):
    """Base of methods that train in stages; see the module docstring."""

    STATE_KEY = "staged"
    stage: int
    stage_ends: list[int]
    stage_records: Any
    _best_score: float = float("-inf")
    _best_state: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------------------ what a method defines
    def configure_stage(self, index: int) -> None:
        """Sets up what differs in stage ``index`` beyond freezing (its log prefix, say)."""

    def frozen_modules(self) -> list[nn.Module]:
        """The networks that teach or wait in the current stage: no gradients, eval mode."""
        return []

    def stage_score(self) -> float:
        """The validation score that selects the stage's best weights (validation accuracy)."""
        return self.metrics.accuracy("val").compute().item()

    def trained_state(self) -> dict[str, Tensor]:
        """A copy of the weights the current stage trains."""
        return {k: v.detach().clone() for k, v in self.active_network().state_dict().items()}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        self.active_network().load_state_dict(state)

    def record_stage(self, best_score: float | None) -> None:
        """Records the finished stage (its best weights are loaded); ``best_score`` None: never validated."""

    def on_best_validation(self) -> None:
        """Called when a validation beats the stage's best so far (after its weights are kept)."""

    # ------------------------------------------------------------------------------ the mechanism
    @property
    def total_epochs(self) -> int:
        return self.stage_ends[-1]

    def _stage_for_epoch(self, epoch: int) -> int:
        """The stage that trains at ``epoch`` (the last stage past the end)."""
        return next((i for i, end in enumerate(self.stage_ends) if epoch < end), len(self.stage_ends) - 1)

    def enter_stage(self, index: int) -> None:
        self.stage = index
        self.configure_stage(index)
        for module in self.trainable_modules():
            module.requires_grad_(True)
        for module in self.frozen_modules():
            module.requires_grad_(False)
            for p in module.parameters():
                p.grad = None  # no stale gradient of an earlier stage stays on a frozen network
        self.train(self.training)
        self.metrics.best.reset()
        self._best_score, self._best_state = float("-inf"), None

    def finish_stage(self) -> None:
        """Loads the stage's best-validation weights and records the stage."""
        if self._best_state is not None:
            self.load_trained_state(self._best_state)
        self.record_stage(self._best_score if self._best_state is not None else None)

    def train(self, mode: bool = True) -> "StagedModule":
        super().train(mode)
        if hasattr(self, "stage"):
            for module in self.frozen_modules():
                module.eval()  # a frozen network's BatchNorm statistics must not move either
        return self

    def check_max_epochs(self, max_epochs: int | None) -> None:
        """One clear error when the Trainer would stop before the last stage (``distill fit`` checks before
        anything is written and then sets ``trainer.max_epochs`` to ``sum(stage_epochs)``)."""
        total = self.total_epochs
        if max_epochs is not None and 0 <= max_epochs < total:
            stages = list(self.hparams.stage_epochs)
            shortened = [0 if epochs == 0 else max(1, epochs * max_epochs // total) for epochs in stages]
            raise ConfigError(f"trainer.max_epochs = {max_epochs} is shorter than the stages, sum(stage_epochs) = "
                              f"{stages} = {total} epochs; to shorten a staged run, shorten its stages (e.g. "
                              f"--model.init_args.stage_epochs {shortened}): trainer.max_epochs follows them.")

    def on_fit_start(self) -> None:
        self.check_max_epochs(self.trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        stage = self._stage_for_epoch(self.current_epoch)
        if stage != self.stage:
            self.finish_stage()
            self.enter_stage(stage)
            self._restart_optimisation()
        super().on_train_epoch_start()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == TrainerFn.FITTING:
            score = self.stage_score()
            if score > self._best_score:
                self._best_score, self._best_state = score, self.trained_state()
                self.on_best_validation()
        super().on_validation_epoch_end()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.current_epoch + 1 >= self.total_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # Only a completed run finishes its last stage; a run stopped early resumes from its checkpoint.
        if self.current_epoch >= self.total_epochs:
            self.finish_stage()

    def on_fit_end(self) -> None:
        self.on_train_end()  # a run resumed from its final checkpoint trains nothing and has no train end

    def _restart_optimisation(self) -> None:
        """A fresh optimiser and schedule for the new stage (and a DDP wrapper that sees its parameters)."""
        strategy = self.trainer.strategy
        strategy.setup_optimizers(self.trainer)
        if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
            rewrap_ddp(strategy)

    def schedule_length(self, interval: str, first: bool = False) -> int:
        """A schedule spans its stage: the stage's (with ``first`` the first stage's) epochs, or their share of the
        fit's optimiser steps."""
        stage = 0 if first else self.stage
        start = self.stage_ends[stage - 1] if stage else 0
        epochs = self.stage_ends[stage] - start
        if interval == "epoch":
            return epochs
        return int(self.trainer.estimated_stepping_batches) // max(int(self.trainer.max_epochs or 1), 1) * epochs

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.STATE_KEY] = {"stage": self.stage, "best_score": self._best_score,
                                      "best_state": self._best_state, "records": copy.deepcopy(self.stage_records),
                                      **self._extra_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint[self.STATE_KEY]
        self.enter_stage(saved["stage"])
        self._best_score, self._best_state = saved["best_score"], saved["best_state"]
        self.stage_records = saved["records"]
        self._load_extra_state(saved)

    def _extra_state(self) -> dict[str, Any]:
        """More of the method's stage state for checkpoints."""
        return {}

    def _load_extra_state(self, saved: dict[str, Any]) -> None:
        pass

    def checkpoint_callback(self) -> ModelCheckpoint:
        # Lightning (2.6) writes last.ckpt only when it also writes a regular checkpoint, so keep the newest
        # epoch's (save_top_k=1 without a monitor); with save_top_k=0 a killed run had nothing to resume from.
        return ModelCheckpoint(monitor=None, save_last=True, save_top_k=1, filename="epoch{epoch:03d}",
                               auto_insert_metric_name=False)


__all__ = ["StagedModule"]
