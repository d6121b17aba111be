"""What every method shares: the trained network, metrics, logging, the optimiser and its schedule.

A method subclasses :class:`DistillModule` (or ``TeacherStudentModule``, ``StagedModule``), declares only its
own arguments (the rest pass through ``**kwargs``) and implements :meth:`DistillModule.training_losses`: the
student's logits and named loss parts, the total under ``"loss"`` (mdistiller's convention).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from distill.callbacks import EpochTrainingMetrics, TrainingThroughput
from distill.errors import ConfigError
from distill.lightning_private import attached_trainer, set_initial_hparams, writes_step_logs
from distill.methods.epoch_means import EpochMeans
from distill.methods.evaluation import EvaluationMetrics
from distill.optim import lightning_optimization
from distill.reliability import RunGuard
from distill.reliability.nonfinite import ReadPendingLosses, StepLosses, all_finite
from distill.teachers import NetworkSpec, load_weights_into

@dataclass
class TrainingBatch:
    """One training step's input, as :meth:`DistillModule.training_losses` receives it."""

    images: Tensor
    labels: Tensor
    #: positions of the images in the training split (for per-sample data such as cached teacher outputs);
    #: None from a DataModule whose batches are ``(images, labels)``
    indices: Tensor | None
    #: the step's batch index in its epoch (seeds per-batch randomness, e.g. PatientConsistentKD's crops)
    batch_idx: int
    #: each image's view number under the loader's augmentation (:class:`distill.data.resident.BatchAugment`),
    #: when the method asked the DataModule for them (``training_views``); else None
    views: Tensor | None = None


#: Epoch-level values a method logs without ``sync_dist`` because they are already reduced or the same on every
#: process. Lightning reduces a ``sync_dist`` value lazily, when something first reads it, and its progress bar reads
#: on rank 0 only: under DDP with the default console rank 0 then ran a collective the other ranks did not, and the
#: run aborted (gloo) or hung (NCCL). Lightning's advice to sync them is silenced for exactly these names.
UNSYNCED_EPOCH_VALUES = r"lr|hp_metric|([a-z0-9_]+/)?val/acc_best|([a-z0-9_]+/)?train/[a-z0-9_/]+"
warnings.filterwarnings("ignore", message=rf"It is recommended to use `self.log\('({UNSYNCED_EPOCH_VALUES})', \.\.\., "
                        r"sync_dist=True\)`")


def split_batch(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(images, labels, indices, views)`` of a batch: a DistillDataModule's ``(images, labels, indices)``, or
    ``(images, labels, indices, views)`` when the method asked it for each image's view number
    (``training_views``), or a DataModule of your own whose batches are ``(images, labels)`` (no indices)."""
    if len(batch) in (2, 3, 4):
        return batch[0], batch[1], batch[2] if len(batch) > 2 else None, batch[3] if len(batch) > 3 else None
    raise ConfigError(f"a training or evaluation batch has {len(batch)} parts; distill's methods take "
                      "(images, labels) or (images, labels, indices) from the DataModule's loaders.")


class DistillModule(L.LightningModule):
    """Base class of all methods.

    Args:
        student: zoo name of the network this run trains (``distill.models.list_models()``); for
            :class:`~distill.methods.Supervised` simply the network trained from labels.
        student_kwargs: extra constructor arguments of the student (e.g. ``{"dropout": 0.5}``).
        student_init: weights the student starts from instead of a random initialisation: a run's checkpoint
            (``RUN_DIR/checkpoints/last.ckpt``: its student) or an exported ``model.safetensors`` of the same
            network (fine-tuning, or a new run from a stopped run's weights with other method arguments, which a
            resume refuses). Optimiser, schedule and epochs start afresh; ``results.json`` records the file and its
            sha256 (``student_init``).
        num_classes: number of classes; the CLI links it from the DataModule.
        in_channels: image channels; linked from the DataModule.
        image_size: input resolution; linked from the DataModule (MLPs need it).
        optimizer: a callable taking the parameters (in YAML a ``class_path`` such as ``torch.optim.SGD`` or
            ``distill.optim.DecoupledAdamW``, with ``init_args``); default: :meth:`default_optimizer`. With
            ``SpeedOptions(fused_optimizer=true)`` it is also given ``fused=True``.
        lr_scheduler: a callable taking the optimiser (``torch.optim.lr_scheduler.MultiStepLR``,
            ``distill.optim.WarmupCosine``, ...); default: :meth:`default_lr_scheduler`. Stepped every epoch
            unless ``lr_scheduler_interval`` is ``"step"`` (WarmupCosine: every step).
        lr_scheduler_interval: ``"epoch"`` or ``"step"``.
    """

    #: Whether :func:`distill.run.finish_fit` also tests the weights the fit ended with and records them
    #: as ``results["end_of_schedule"]``; for methods whose paper reports the end of the schedule.
    report_end_of_schedule: bool = False
    #: What a NaN/inf training loss does: ``"stop"`` the run with an error naming the step and loss part,
    #: or ``"skip"`` the batch and count it in ``train/skipped_nonfinite`` (``distill fit --nonfinite_loss``).
    nonfinite_loss = "stop"
    #: Whether the method augments its training batches on the device itself, so that the loaders must not
    #: (it then trains on ``data.augment: none``, which :meth:`check_training_data` enforces).
    augments_on_device: bool = False

    def __init__(
        self,
        student: str,
        student_kwargs: dict[str, Any] | None = None,
        student_init: str | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        self.save_hyperparameters()
        # Callables cannot go into a checkpoint's hyperparameters without pickling code; under the CLI
        # they arrive as plain class_path dicts and stay.
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if callable(v)])
        # The method's name for TensorBoard's hparams view, not in `hparams` (which go back into __init__).
        set_initial_hparams(self, {"method": type(self).__name__})
        self.student_spec = NetworkSpec(student, num_classes, in_channels, image_size, dict(student_kwargs or {}))
        self.student = self.student_spec.build()
        #: ``{"path", "sha256"}`` of the weights the student started from (``student_init``), for results.json
        self.student_init_info = load_weights_into(self.student, self.student_spec, student_init) \
            if student_init is not None else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        #: Prepended to every logged name; staged methods set it per stage (``"ta1/"``).
        self.log_prefix = ""
        #: Batches skipped for a non-finite loss (``nonfinite_loss = "skip"``), kept across resumes.
        self.skipped_nonfinite = 0
        #: ``(global_step, val_acc)`` of this process's latest validation (not the sanity check), for finish_fit.
        self.last_validation: tuple[int, Tensor] | None = None
        self.train_means = EpochMeans()  # loss parts and accuracy of the training epoch
        #: the steps' loss parts on the device, read on the host every few steps (distill.reliability.nonfinite)
        self.step_losses = StepLosses()
        self.metrics = EvaluationMetrics(num_classes)
        #: the active teacher's logits per val/test index, filled by distill.callbacks.EvalTeacherCache
        self.eval_teacher_logits: dict[str, Tensor] = {}

    # ----------------------------------------------------------------------------------- what a method defines
    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the student's logits and the loss parts, the total under ``"loss"``."""
        raise NotImplementedError

    def active_teacher(self) -> nn.Module | None:
        """The network teaching now (None: no teacher); staged methods change it from stage to stage."""
        return None

    def active_network(self) -> nn.Module:
        """The network being trained and evaluated now; staged methods change it from stage to stage."""
        return self.student

    def trainable_modules(self) -> list[nn.Module]:
        """The modules whose parameters the optimiser updates (never a teacher)."""
        return [self.student]

    def check_training_data(self, augment: str, device_resident: bool = False) -> None:
        """Raises :class:`~distill.errors.ConfigError` if the method cannot train on loaders with this
        augmentation preset (on device-resident data or not). ``distill fit`` calls it before the run directory
        is made; ``setup`` for runs from Python."""

    def training_augment(self) -> str:
        """The training loaders' augmentation preset (``"none"`` when fit without a DistillDataModule)."""
        return getattr(getattr(self.trainer, "datamodule", None), "augment", "none")

    def setup(self, stage: str) -> None:
        if stage == "fit":
            data = getattr(self.trainer, "datamodule", None)
            self.check_training_data(self.training_augment(), bool(getattr(data, "device_resident", False)))

    def forward(self, images: Tensor) -> Tensor:
        return self.active_network()(images)

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor | None:
        images, labels, indices, views = split_batch(batch)
        logits, losses = self.training_losses(TrainingBatch(images, labels, indices, batch_idx, views))
        loss, trainer = losses["loss"], attached_trainer(self)
        if self.nonfinite_loss == "skip" and not all_finite(loss, trainer):
            self.skipped_nonfinite += 1
            return None  # automatic optimisation: no backward, no optimiser step for this batch
        # Nothing here reads a device value on the host (that would wait for the GPU every step): epoch means are
        # summed on the device (EpochMeans, logged once per epoch by EpochTrainingMetrics) and the loss parts are
        # read every few steps (StepLosses: the non-finite check, the step logs and the progress bar's loss).
        self.train_means.update({**{f"{self.log_prefix}train/{name}_epoch": value for name, value in losses.items()},
                                 f"{self.log_prefix}train/acc": logits.argmax(dim=-1) == labels}, images.shape[0])
        self.step_losses.record(losses, self.log_prefix, self.global_step, self.current_epoch, batch_idx)
        written = trainer is None or writes_step_logs(trainer)
        if written or self.step_losses.due() or batch_idx + 1 >= trainer.num_training_batches:
            self._log_step_values(self.step_losses.read(trainer), written, trainer, images.shape[0])
        return loss

    def _log_step_values(self, values: dict[str, Tensor], written: bool, trainer: L.Trainer | None,
                         batch_size: int) -> None:
        """Logs the step's loss parts (host tensors) on the steps the loggers write, and the loss for a progress
        bar whenever they are read. Each self.log call costs Lightning 0.5-2 ms of Python, as much as a small
        network's step, hence not every step."""
        progress_bar = trainer is not None and trainer.progress_bar_callback is not None
        for name, value in values.items():
            if written or (progress_bar and name == "loss"):
                self.log(f"{self.log_prefix}train/{name}_step", value, on_step=True, on_epoch=False,
                         prog_bar=progress_bar and name == "loss", batch_size=batch_size)
        if written and trainer is not None:  # the rate as the step used it: warm-ups are visible (a host value)
            self.log("lr_step", torch.tensor(float(trainer.optimizers[0].param_groups[0]["lr"])), on_step=True,
                     on_epoch=False)

    def log_train_epoch_metrics(self) -> None:
        """Logs the epoch means of the loss parts (``train/<part>_epoch``) and the accuracy (``train/acc``),
        reduced over processes once, weighted by batch size."""
        for key, mean in self.train_means.compute(self.trainer.strategy).items():
            self.log(key, mean, on_step=False, on_epoch=True)

    def on_train_start(self) -> None:
        self.metrics.best.reset()  # the sanity-check validation must not count

    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers()
        optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
        # the same on every process: logged unsynchronised (see UNSYNCED_EPOCH_VALUES)
        self.log("lr", optimizer.param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        if self.nonfinite_loss == "skip":  # every process's skips, summed here, in a hook all processes run
            skipped = torch.tensor(float(self.skipped_nonfinite), device=self.device)
            skipped = self.trainer.strategy.reduce(skipped, reduce_op="sum")
            self.log("train/skipped_nonfinite", skipped, on_step=False, on_epoch=True)

    # ----------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Sequence[Tensor], stage: str) -> None:
        images, labels, indices, _ = split_batch(batch)
        logits = self.active_network()(images)
        reference = None
        if self.active_teacher() is not None:
            cached = self.eval_teacher_logits.get(stage)
            reference = cached[indices.to(cached.device)] if cached is not None else self.teacher_logits(images)
        self.metrics.update(stage, logits, labels, reference, self.log, self.log_prefix)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        accuracy, best = self.metrics.end_validation()
        self.last_validation = (self.global_step, accuracy)
        # `best` is already the same on every process (torchmetrics reduces in compute): unsynchronised
        self.log(f"{self.log_prefix}val/acc_best", best)
        self.log("hp_metric", best)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Class probabilities, with the images' positions and labels when the batch has them."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        output = {"probabilities": self.active_network()(images).float().softmax(dim=-1)}
        if isinstance(batch, (tuple, list)) and len(batch) == 3:
            output.update(labels=batch[1], indices=batch[2])
        return output

    def evaluation_stages(self) -> list[str]:
        """Names of the networks a staged method tests one by one at the end of ``fit`` (none here)."""
        return []

    def select_stage(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def student_network(self) -> nn.Module:
        """The trained network as a plain module, for export and for use as a teacher."""
        return self.student

    # ----------------------------------------------------------------------------------- optimisation
    def default_optimizer(self, params: list[nn.Parameter], **options: Any) -> torch.optim.Optimizer:
        """The optimiser when the config names none: RepDistiller's CIFAR recipe. ``options``: implementation
        choices such as ``fused=True`` (:class:`~distill.callbacks.SpeedOptions`)."""
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, **options)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The schedule when the config names none: a constant rate."""
        return None

    def schedule_length(self, interval: str, first: bool = False) -> int:
        """Optimiser steps (``"step"``) or epochs (``"epoch"``) a schedule spans: the whole fit (staged: this stage,
        or with ``first`` the first one, whose length a recipe's schedule scales to)."""
        if interval == "epoch":
            if not self.trainer.max_epochs or self.trainer.max_epochs < 1:
                raise ConfigError("the schedule takes its length from trainer.max_epochs, which is not set; set it, "
                                  "or give the schedule its length (T_max).")
            return int(self.trainer.max_epochs)
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self) -> Any:
        params = [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]
        return lightning_optimization(params, self.optimizer_factory or self.default_optimizer,
                                      self.lr_scheduler_factory or self.default_lr_scheduler, attached_trainer(self),
                                      self.hparams.lr_scheduler_interval, self.schedule_length,
                                      lambda: self.schedule_length("epoch", first=True))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Without a gradient_clip_val Lightning would only validate its arguments and clip at 0 (not at all).
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------------- callbacks, checkpoints
    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = [TrainingThroughput(), EpochTrainingMetrics(), RunGuard(), ReadPendingLosses()]
        # The method's checkpointing, unless the user configured a monitored checkpoint of their own.
        if not any(c.monitor for c in self.trainer.checkpoint_callbacks):
            callbacks.append(self.checkpoint_callback())
        return callbacks

    def checkpoint_callback(self) -> ModelCheckpoint:
        """Model selection on validation accuracy, plus ``last.ckpt`` for resuming."""
        return ModelCheckpoint(monitor="val/acc", mode="max", save_last=True, filename="best-epoch{epoch:03d}",
                               auto_insert_metric_name=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_nonfinite"] = self.skipped_nonfinite

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = checkpoint.get("skipped_nonfinite", 0)


__all__ = ["DistillModule", "TrainingBatch"]
