"""TeacherAssistantKD: Mirzadeh et al. (AAAI 2020), "Improved Knowledge Distillation via Teacher Assistant"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.errors import ConfigError
from distill.losses import hinton_kd_objective, validate_kd_hparams
from distill.methods import training_cache
from distill.methods.base import TrainingBatch
from distill.methods.staged import StagedModule
from distill.teachers import NetworkSpec, load_network, save_network


class TeacherAssistantKD(training_cache.CachesTeacherOutputs, StagedModule):
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
    The run stops after the last stage; ``distill fit`` sets ``trainer.max_epochs`` to ``sum(stage_epochs)`` and
    rejects a shorter one before anything is written (shorten a run through ``stage_epochs``).

    Args:
        assistants: zoo names of the TAs, largest first (the path's order); ``[]`` is plain KD.
        stage_epochs: epochs per stage, one per assistant plus one for the student.
        assistant_checkpoints: optional, one entry per assistant: a file with that TA's trained
            weights (any ``teacher`` format), or ``null`` to train it. A supplied TA's stage is skipped,
            and its ``stage_epochs`` entry must be 0.
        assistant_kwargs: optional constructor arguments per assistant.
        temperature, alpha: τ and the soft-term weight for every stage (defaults as BaselineKD; the
            paper tuned λ and τ per experiment and did not publish them).
        stage_temperature, stage_alpha: optional per-stage overrides.
        cache_teacher_outputs: at the start of each stage, compute the stage's teacher's logits on the training
            split once (every crop and flip of every image on augmented device-resident data) and look them up in
            the steps instead of running the teacher: see :mod:`distill.methods.training_cache` and BaselineKD's
            argument of the same name. An assistant's outputs are keyed by its trained weights. Our addition.
        teacher_cache_dir: folder of the caches; null = ``<trainer.default_root_dir>/teacher_cache``.
        **kwargs: ``student`` (the final student), the path's first ``teacher`` (:class:`TeacherStudentModule`),
            optimiser and schedule (:class:`DistillModule`).
    """

    STATE_KEY = "teacher_assistant"

    def __init__(
        self,
        *,
        assistants: list[str],
        stage_epochs: list[int],
        assistant_checkpoints: list[str | None] | None = None,
        assistant_kwargs: list[dict[str, Any]] | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        stage_temperature: list[float] | None = None,
        stage_alpha: list[float] | None = None,
        cache_teacher_outputs: bool = False,
        teacher_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher_cache_dir and not cache_teacher_outputs:
            raise ConfigError("teacher_cache_dir is only used with cache_teacher_outputs: true; set it, or remove it.")
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
        super().__init__(**kwargs)
        hp = self.hparams
        self.assistant_specs = [NetworkSpec(name, hp.num_classes, hp.in_channels, hp.image_size, dict(extra))
                                for name, extra in zip(assistants, per_assistant["assistant_kwargs"])]
        self.assistants = nn.ModuleList(spec.build() for spec in self.assistant_specs)
        for network, spec, checkpoint in zip(self.assistants, self.assistant_specs, checkpoints):
            if checkpoint is not None:
                loaded = load_network(checkpoint, spec.model, hp.num_classes, hp.in_channels, hp.image_size,
                                      spec.model_kwargs)
                network.load_state_dict(loaded.network.state_dict())
        self.stage_temperature, self.stage_alpha = per_stage["stage_temperature"], per_stage["stage_alpha"]
        self.stage_names = [f"ta{i + 1}" for i in range(len(assistants))] + ["student"]
        self.stage_specs = self.assistant_specs + [self.student_spec]
        self.stage_ends = [sum(stage_epochs[: i + 1]) for i in range(stages)]
        self.stage_records: list[dict[str, Any]] = [
            {"stage": name, "model": spec.model, "epochs": epochs, "supplied": checkpoint}
            for name, spec, epochs, checkpoint in zip(self.stage_names, self.stage_specs, stage_epochs, checkpoints + [None])
        ]
        #: the stage whose teacher's training logits ``cached_logits`` holds (cache_teacher_outputs)
        self.cached_logits: Tensor | None = None
        self._cached_stage: int | None = None
        self.enter_stage(self._stage_for_epoch(0))

    # ------------------------------------------------------------------------------ the path
    def networks(self) -> list[nn.Module]:
        return [*self.assistants, self.student]

    def active_network(self) -> nn.Module:
        return self.networks()[self.stage]

    def active_teacher(self) -> nn.Module | None:
        return self.teacher if self.stage == 0 else self.networks()[self.stage - 1]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.active_network()]

    def _stage_for_epoch(self, epoch: int) -> int:
        """The first stage that is trained and not finished at ``epoch`` (the last stage past the end)."""
        for index, end in enumerate(self.stage_ends):
            if self.hparams.stage_epochs[index] > 0 and epoch < end:
                return index
        return len(self.stage_ends) - 1

    def configure_stage(self, index: int) -> None:
        self.log_prefix = f"{self.stage_names[index]}/"

    def frozen_modules(self) -> list[nn.Module]:
        # earlier stages teach, later ones wait: none of them learns
        return [network for position, network in enumerate(self.networks()) if position != self.stage]

    # ------------------------------------------------------------------------------ the teacher cache
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._cache_stage_teacher()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # enters the next stage when one starts
        self._cache_stage_teacher()

    def _cache_stage_teacher(self) -> None:
        if self.hparams.cache_teacher_outputs and self._cached_stage != self.stage:
            self.cached_logits = None  # the previous stage's teacher's, released before the next is built
            self.cached_logits = training_cache.load_training_outputs(
                self, f"TeacherAssistantKD {self.stage_names[self.stage]}", cache_dir=self.hparams.teacher_cache_dir)
            self._cached_stage = self.stage

    def training_teacher_logits(self, batch: TrainingBatch) -> Tensor:
        """The stage's teacher's logits for this batch: looked up when its outputs are cached, else computed."""
        if self.cached_logits is not None and self._cached_stage == self.stage:
            return training_cache.look_up(self.cached_logits, batch)
        return self.teacher_logits(batch.images)

    # ------------------------------------------------------------------------------ training
    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.active_network()(batch.images)
        losses = hinton_kd_objective(logits, self.training_teacher_logits(batch), batch.labels,
                                     temperature=self.stage_temperature[self.stage], alpha=self.stage_alpha[self.stage])
        return logits, losses

    def record_stage(self, best_score: float | None) -> None:
        """Records the stage's best-validation weights (loaded now) and exports them, once per stage."""
        record = self.stage_records[self.stage]
        if "best_val_acc" in record:
            return
        record["best_val_acc"] = best_score
        log_dir = self.trainer.log_dir  # a collective under DDP: every process must ask
        if log_dir:
            path = Path(log_dir) / "stages" / f"{self.stage_names[self.stage]}.safetensors"
            record["model_file"] = str(path)
        if self.trainer.is_global_zero and log_dir:
            save_network(self.active_network(), self.stage_specs[self.stage], path,
                         best_val_acc=best_score, stage=self.stage_names[self.stage])

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
