"""TeacherAssistantKD: Mirzadeh et al. (AAAI 2020), "Improved Knowledge Distillation via Teacher Assistant"."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.losses import hinton_kd_objective
from distill.methods.base import DistillModule, OptimizerFactory, SchedulerFactory
from distill.methods.baseline_kd import validate_kd_hparams
from distill.teachers import NetworkSpec, load_network, save_network


class TeacherAssistantKD(DistillModule):
    """A whole distillation path, teacher → TA₁ → … → TAₖ → student, trained in one run.

    Each stage is :class:`~distill.methods.BaselineKD` from the previous network:
    ``(1−α)·CE + α·τ²·KL(p_prev^τ ‖ p^τ)`` (the paper's ``λ`` is our α; see BaselineKD for the official
    code's ``KLDivLoss`` reduction, which divides the soft term by the number of classes). The previous
    network is frozen and in eval mode while it teaches. k = 0 assistants is plain KD.

    Stages run one after another: stage *i* trains for ``stage_epochs[i]`` epochs with a fresh
    optimiser and LR schedule built from the same ``optimizer``/``lr_scheduler`` recipe (a schedule's
    epochs count from the stage's start, so ``MultiStepLR(milestones=[80, 120])`` is the paper's
    schedule in every stage). ``stage_temperature``/``stage_alpha`` override τ/α per stage. Each stage
    logs under its own prefix (``ta1/val/acc``, ``student/val/acc``), keeps its best-validation weights,
    starts the next stage from them (not from its last weights) and exports them to
    ``<run_dir>/stages/<stage>.safetensors``, a file that works as the ``teacher`` of any method.
    ``trainer.max_epochs`` must be at least ``sum(stage_epochs)``; the run stops there.

    Args:
        student: zoo name of the final student.
        assistants: zoo names of the TAs, largest first (the path's order); ``[]`` is plain KD.
        stage_epochs: epochs per stage, one per assistant plus one for the student.
        assistant_checkpoints: optional, one entry per assistant: a file with that TA's trained
            weights (any ``teacher`` format), or ``null`` to train it. A supplied TA's stage is skipped,
            and its ``stage_epochs`` entry must be 0.
        assistant_kwargs: optional constructor arguments per assistant.
        teacher, teacher_model, teacher_kwargs, teacher_pretrained: the path's first teacher, as in
            :class:`~distill.methods.BaselineKD`.
        temperature, alpha: τ and the soft-term weight for every stage (defaults as BaselineKD; the
            paper tuned λ and τ per experiment and did not publish them).
        stage_temperature, stage_alpha: optional per-stage overrides.
    """

    def __init__(
        self,
        student: str,
        assistants: list[str],
        stage_epochs: list[int],
        teacher: str | None = None,
        teacher_model: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_pretrained: bool = False,
        assistant_checkpoints: list[str | None] | None = None,
        assistant_kwargs: list[dict[str, Any]] | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        stage_temperature: list[float] | None = None,
        stage_alpha: list[float] | None = None,
        student_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        lr_scheduler_interval: str = "epoch",
    ) -> None:
        stages = len(assistants) + 1
        checkpoints = list(assistant_checkpoints or [None] * len(assistants))
        per_assistant = {"assistant_checkpoints": checkpoints, "assistant_kwargs": assistant_kwargs or [{}] * len(assistants)}
        per_stage = {"stage_epochs": stage_epochs, "stage_temperature": stage_temperature or [temperature] * stages,
                     "stage_alpha": stage_alpha or [alpha] * stages}
        for name, values in per_assistant.items():
            if len(values) != len(assistants):
                raise ConfigError(f"{name} has {len(values)} entries but there are {len(assistants)} assistants.")
        for name, values in per_stage.items():
            if len(values) != stages:
                raise ConfigError(f"{name} needs {stages} entries (one per assistant, then the student); "
                                  f"got {len(values)}.")
        for tau, weight in zip(per_stage["stage_temperature"], per_stage["stage_alpha"]):
            validate_kd_hparams(tau, weight)
        for index, (epochs, checkpoint) in enumerate(zip(stage_epochs, checkpoints + [None])):
            if epochs < 0 or (epochs == 0 and checkpoint is None):
                raise ConfigError(f"stage_epochs[{index}] = {epochs}: a stage that is trained needs at least 1 epoch.")
            if checkpoint is not None and epochs != 0:
                raise ConfigError(f"assistant {assistants[index]!r} is supplied as {checkpoint}, so its stage is "
                                  f"skipped: set stage_epochs[{index}] to 0.")
        super().__init__(student, student_kwargs, num_classes, in_channels, image_size,
                         optimizer, lr_scheduler, lr_scheduler_interval)
        self.attach_teacher(teacher, teacher_model, teacher_kwargs, teacher_pretrained)
        self.assistant_specs = [NetworkSpec(name, num_classes, in_channels, image_size, dict(kwargs))
                                for name, kwargs in zip(assistants, per_assistant["assistant_kwargs"])]
        self.assistants = nn.ModuleList(spec.build() for spec in self.assistant_specs)
        for network, spec, checkpoint in zip(self.assistants, self.assistant_specs, checkpoints):
            if checkpoint is not None:
                loaded = load_network(checkpoint, spec.model, num_classes, in_channels, image_size, spec.model_kwargs)
                network.load_state_dict(loaded.network.state_dict())
        self.stage_temperature, self.stage_alpha = per_stage["stage_temperature"], per_stage["stage_alpha"]
        self.stage_names = [f"ta{i + 1}" for i in range(len(assistants))] + ["student"]
        self.stage_specs = self.assistant_specs + [self.student_spec]
        self.stage_ends = [sum(stage_epochs[: i + 1]) for i in range(stages)]
        self.stage_records: list[dict[str, Any]] = [
            {"stage": name, "model": spec.model, "epochs": epochs, "supplied": checkpoint}
            for name, spec, epochs, checkpoint in zip(self.stage_names, self.stage_specs, stage_epochs, checkpoints + [None])
        ]
        self._best_score = float("-inf")
        self._best_state: dict[str, Tensor] | None = None
        self._enter_stage(self._stage_for_epoch(0))

    # ------------------------------------------------------------------------------ the path
    def networks(self) -> list[nn.Module]:
        return [*self.assistants, self.student]

    def active_network(self) -> nn.Module:
        return self.networks()[self.stage]

    def active_teacher(self) -> nn.Module | None:
        return self.teacher if self.stage == 0 else self.networks()[self.stage - 1]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.active_network()]

    @property
    def total_epochs(self) -> int:
        return self.stage_ends[-1]

    def _stage_for_epoch(self, epoch: int) -> int:
        """The first stage that is trained and not finished at ``epoch`` (the last stage past the end)."""
        for index, end in enumerate(self.stage_ends):
            if self.hparams.stage_epochs[index] > 0 and epoch < end:
                return index
        return len(self.stage_ends) - 1

    def _enter_stage(self, index: int) -> None:
        self.stage = index
        self.log_prefix = f"{self.stage_names[index]}/"
        for position, network in enumerate(self.networks()):
            network.requires_grad_(position == index)
        self.train(self.training)  # puts every network but the active one in eval mode
        self.val_acc_best.reset()
        self._best_score, self._best_state = float("-inf"), None

    def train(self, mode: bool = True) -> "TeacherAssistantKD":
        super().train(mode)
        if hasattr(self, "stage"):
            for position, network in enumerate(self.networks()):
                if position != self.stage:
                    network.eval()  # earlier stages teach, later ones wait: none of them learns
        return self

    # ------------------------------------------------------------------------------ training
    def training_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.active_network()(images)
        losses = hinton_kd_objective(logits, self.teacher_logits(images), labels,
                                     temperature=self.stage_temperature[self.stage], alpha=self.stage_alpha[self.stage])
        return logits, losses

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

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            score = self.val_acc.compute().item()
            if score > self._best_score:
                self._best_score = score
                self._best_state = {k: v.detach().clone() for k, v in self.active_network().state_dict().items()}
        super().on_validation_epoch_end()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.current_epoch + 1 >= self.total_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # Only a completed path finishes its last stage; a run stopped early resumes from its checkpoint.
        if self.current_epoch >= self.total_epochs:
            self._finish_stage()

    def on_fit_end(self) -> None:
        self.on_train_end()  # a run resumed from its final checkpoint trains nothing and has no train end

    def _finish_stage(self) -> None:
        """Loads the stage's best-validation weights, records and exports them (once per stage)."""
        record = self.stage_records[self.stage]
        if "best_val_acc" in record:
            return
        if self._best_state is not None:
            self.active_network().load_state_dict(self._best_state)
        record["best_val_acc"] = self._best_score if self._best_state is not None else None
        log_dir = self.trainer.log_dir  # a collective under DDP: every process must ask
        if log_dir:
            path = Path(log_dir) / "stages" / f"{self.stage_names[self.stage]}.safetensors"
            record["model_file"] = str(path)
        if self.trainer.is_global_zero and log_dir:
            save_network(self.active_network(), self.stage_specs[self.stage], path,
                         best_val_acc=record["best_val_acc"], stage=self.stage_names[self.stage])

    def _restart_optimisation(self) -> None:
        """A fresh optimiser and schedule for the new stage (and a DDP wrapper that sees its parameters)."""
        strategy = self.trainer.strategy
        strategy.setup_optimizers(self.trainer)
        if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
            # DDP fixes the set of parameters it synchronises when it wraps the module: wrap again.
            strategy.model = strategy._setup_model(strategy.lightning_module)
            strategy._register_ddp_hooks()

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher_assistant"] = {
            "stage": self.stage,
            "best_score": self._best_score,
            "best_state": self._best_state,
            "records": copy.deepcopy(self.stage_records),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["teacher_assistant"]
        self._enter_stage(saved["stage"])
        self._best_score, self._best_state = saved["best_score"], saved["best_state"]
        self.stage_records = saved["records"]

    def checkpoint_callback(self) -> ModelCheckpoint:
        # Model selection happens per stage inside the module. Lightning (2.6) writes last.ckpt only
        # when it also writes a regular checkpoint, so keep the newest epoch's (save_top_k=1 without a
        # monitor); with save_top_k=0 a killed run had no checkpoint to resume from.
        return ModelCheckpoint(monitor=None, save_last=True, save_top_k=1, filename="epoch{epoch:03d}",
                               auto_insert_metric_name=False)

    # ------------------------------------------------------------------------------ evaluation
    def evaluation_stages(self) -> list[str]:
        return list(self.stage_names)

    def select_stage(self, name: str) -> dict[str, Any]:
        """Makes stage ``name`` the one that validation/test evaluate; returns its record."""
        index = self.stage_names.index(name)
        self.stage = index
        self.log_prefix = f"{name}/"
        return self.stage_records[index]


__all__ = ["TeacherAssistantKD"]
