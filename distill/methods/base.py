"""What every method shares: the trained network, the frozen teacher, metrics, logging, optimisers.

A method subclasses :class:`DistillModule` and implements :meth:`DistillModule.training_losses`, which
returns the student's logits and a dict of named loss parts with the total under ``"loss"``
(mdistiller's convention). Everything else — logging each part as ``train/<part>``, accuracy and
teacher–student agreement metrics, the optimiser and schedule from the config, keeping the teacher
frozen and out of checkpoints — lives here once.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from distill.errors import CheckpointError, ConfigError, NonFiniteLossError
from distill.lightning_private import HOOK_NAME_ATTRIBUTE, blocking_device_types, set_initial_hparams, writes_step_logs
from distill.losses import soft_target_kl, top1_agreement
from distill.reliability import RunGuard
from distill.scaling import scale_learning_rates
from distill.speed import trim_loop_overhead
from distill.teachers import LoadedNetwork, NetworkSpec, load_network

# Lightning's callable types, which LightningCLI knows how to build from `class_path` + `init_args`.
OptimizerFactory = OptimizerCallable
SchedulerFactory = LRSchedulerCallable

TEACHER_PREFIX = "teacher."

# Lightning warns when modules are in eval mode as training starts; a frozen teacher always is.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Returning None from training_step is how `nonfinite_loss = "skip"` skips a batch.
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
# DistillModule moves batches itself (transfer_batch_to_device); Lightning says so once per run when a
# DataModule is given, though one that moves batches its own way still takes precedence.
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule` but")


#: Attributes set around every hook call (Lightning's ``_current_fx_name``, about 40 times a training
#: step) or on every step by the methods; none is ever a parameter, buffer or submodule, so they skip
#: ``nn.Module.__setattr__``'s registry checks (~1.7 µs a call on a CPU).
_PLAIN_ATTRIBUTES = frozenset({HOOK_NAME_ATTRIBUTE, "batch_indices", "_batch_idx"})


def _presign_training_step(cls: type) -> None:
    # Lightning asks inspect.getfullargspec whether training_step takes batch_idx on every step
    # (~14 µs); with __signature__ set, inspect returns it instead of rebuilding it from the code.
    step = cls.__dict__.get("training_step")
    if inspect.isfunction(step) and "__signature__" not in step.__dict__:
        step.__signature__ = inspect.signature(step)


class DistillModule(L.LightningModule):
    """Base class of all methods.

    Args:
        student: zoo name of the network this run trains (``distill.models.list_models()``). For
            :class:`~distill.methods.Supervised` it is simply the network trained from labels, which may
            later serve as a teacher.
        student_kwargs: extra constructor arguments of the student (e.g. ``{"dropout": 0.5}``).
        num_classes: number of classes; the CLI links it from the DataModule.
        in_channels: image channels; linked from the DataModule.
        image_size: input resolution; linked from the DataModule (MLPs need it).
        optimizer: the optimiser, as a callable taking the parameters (in YAML a ``class_path`` such
            as ``torch.optim.SGD`` with ``init_args``). Default: SGD, lr 0.05, momentum 0.9,
            weight decay 5e-4 (RepDistiller's CIFAR recipe).
        lr_scheduler: a callable taking the optimiser (e.g. ``torch.optim.lr_scheduler.MultiStepLR``);
            ``None`` keeps the learning rate constant. Stepped every epoch unless
            ``lr_scheduler_interval`` is ``"step"``.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``.
    """

    #: Whether :func:`distill.run.finish_fit` also tests the weights the fit ended with and records them
    #: as ``results["end_of_schedule"]``, next to the best-validation checkpoint's ``test_acc``; for
    #: methods whose paper reports the student at the end of its schedule (PatientConsistentKD).
    report_end_of_schedule: bool = False

    def __init__(
        self,
        student: str,
        student_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        lr_scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        self.save_hyperparameters()
        # Callables cannot go into a checkpoint's hyperparameters without pickling code; under the CLI
        # they arrive as plain class_path dicts and stay.
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if callable(v)])
        # The method's name for TensorBoard's hparams view (loggers read the initial hparams), so runs
        # can be filtered by method; not in `hparams`, which go back into __init__ when a checkpoint loads.
        set_initial_hparams(self, {"method": type(self).__name__})
        self.student_spec = NetworkSpec(student, num_classes, in_channels, image_size, dict(student_kwargs or {}))
        self.student = self.student_spec.build()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.teacher: nn.Module | None = None
        self.teacher_info: dict[str, Any] | None = None
        #: Prepended to every logged name; staged methods set it per stage (``"ta1/"``).
        self.log_prefix = ""
        #: Training-split indices of the current training batch (set in training_step).
        self.batch_indices: Tensor | None = None
        #: Batches skipped for a non-finite loss (``nonfinite_loss = "skip"``), kept across resumes.
        self.skipped_nonfinite = 0
        #: ``(global_step, val_acc)`` of this process's latest validation (not the sanity check);
        #: finish_fit takes ``val_acc`` from it when that validation saw the weights the fit ended with.
        self.last_validation: tuple[int, Tensor] | None = None
        self._configure_metrics(num_classes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _presign_training_step(cls)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ----------------------------------------------------------------------------------- teacher
    def attach_teacher(
        self,
        path: str | None,
        model: str | None,
        model_kwargs: dict[str, Any] | None,
        pretrained: bool,
    ) -> None:
        """Loads the teacher and freezes it: no gradients, eval mode for good, never optimised."""
        loaded: LoadedNetwork = load_network(
            path,
            model,
            num_classes=self.hparams.num_classes,
            in_channels=self.hparams.in_channels,
            image_size=self.hparams.image_size,
            model_kwargs=model_kwargs,
            pretrained=pretrained,
        )
        teacher = loaded.network.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.teacher_info = loaded.describe()

    def train(self, mode: bool = True) -> "DistillModule":
        # Lightning switches the whole module to train mode each epoch; the teacher must keep using
        # its BatchNorm running statistics and no dropout.
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def training_augment(self) -> str:
        """The training loaders' augmentation preset (``"none"`` when fit without a DistillDataModule)."""
        return getattr(getattr(self.trainer, "datamodule", None), "augment", "none")

    def check_training_data(self, augment: str) -> None:
        """Raises :class:`~distill.errors.ConfigError` if the method cannot train on loaders with this
        augmentation preset (nothing to check here). ``distill fit`` calls it before the run directory
        is made, so such a run fails before anything is written; ``setup`` calls it for runs from Python."""

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_training_data(self.training_augment())

    def active_teacher(self) -> nn.Module | None:
        """The network teaching now; staged methods change it from stage to stage."""
        return self.teacher

    def active_network(self) -> nn.Module:
        """The network being trained and evaluated now; staged methods change it from stage to stage."""
        return self.student

    def teacher_logits(self, images: Tensor) -> Tensor:
        """Teacher forward under ``torch.inference_mode`` (no autograd graph, no version counting).

        The result is cloned outside inference mode: an inference tensor may not be saved for the
        student's backward pass, which a loss is free to do with the teacher's logits; the clone of a
        ``B x classes`` tensor costs next to nothing. Runs under the step's autocast, so in bf16 with
        ``precision: bf16-mixed``.
        """
        teacher = self.active_teacher()
        assert teacher is not None
        with torch.inference_mode():
            logits = teacher(images)
        return logits.clone() if logits.is_inference() else logits

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is an input, not a result: checkpoints record where it came from, not its tensors.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        if self.teacher_info is not None:
            checkpoint["teacher"] = dict(self.teacher_info)
        checkpoint["skipped_nonfinite"] = self.skipped_nonfinite

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = checkpoint.get("skipped_nonfinite", 0)
        if self.teacher is None:
            return
        recorded = checkpoint.get("teacher") or {}
        current = self.teacher_info or {}
        if recorded.get("sha256") and current.get("sha256") and recorded["sha256"] != current["sha256"]:
            raise CheckpointError(
                f"the checkpoint was trained with teacher {recorded.get('path')} (sha256 "
                f"{recorded['sha256'][:12]}…) but the configured teacher {current.get('path')} differs "
                f"(sha256 {current['sha256'][:12]}…); resume with the original teacher file."
            )
        # Put the (unchanged) teacher back so that Lightning's strict state_dict loading succeeds.
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(TEACHER_PREFIX + key, value)

    # ----------------------------------------------------------------------------------- metrics
    def _configure_metrics(self, num_classes: int) -> None:
        def accuracy(top_k: int = 1) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")

        self.top5 = num_classes > 5
        self.train_means = EpochMeans()  # loss parts and accuracy of the training epoch
        self.val_acc, self.test_acc = accuracy(), accuracy()
        self.val_acc_top5 = accuracy(5) if self.top5 else None
        self.test_acc_top5 = accuracy(5) if self.top5 else None
        self.val_acc_best = MaxMetric()
        self.val_agreement, self.test_agreement = MeanMetric(), MeanMetric()
        #: the active teacher's logits per val/test index, filled by distill.speed.EvalTeacherCache (else empty)
        self.eval_teacher_logits: dict[str, Tensor] = {}
        self.val_kl, self.test_kl = MeanMetric(), MeanMetric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def on_train_start(self) -> None:
        # The sanity-check validation must not count towards the best validation accuracy.
        self.val_acc_best.reset()

    # ----------------------------------------------------------------------------------- steps
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The loaders' batch, a tuple or list of tensors, is moved as Lightning moves it, without its
        # generic walk over collections (~20 µs a step on a CPU); anything else goes that way.
        if type(batch) in (tuple, list) and all(type(item) is Tensor for item in batch):
            non_blocking = isinstance(device, torch.device) and device.type not in blocking_device_types()
            return type(batch)(item.to(device, non_blocking=True) if non_blocking else item.to(device)
                               for item in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def forward(self, images: Tensor) -> Tensor:
        return self.active_network()(images)

    def training_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the student's logits and the loss parts, the total under ``"loss"``."""
        raise NotImplementedError

    #: What a NaN/inf training loss does: ``"stop"`` the run with an error naming the step and loss
    #: part (the last good checkpoint stays as it is), or ``"skip"`` the batch (no optimiser step) and
    #: count it in ``train/skipped_nonfinite``. ``distill fit --nonfinite_loss skip`` sets it.
    nonfinite_loss = "stop"

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, labels, indices = batch
        self.batch_indices = indices  # for methods that look up per-sample data, e.g. cached teacher outputs
        logits, losses = self.training_losses(images, labels)
        loss = losses["loss"]
        if not self._finite(loss):
            return self._on_nonfinite(losses, batch_idx)
        batch_size = images.shape[0]
        prefix = f"{self.log_prefix}train/"
        # Each self.log call, like each torchmetrics update, costs Lightning ~0.5-2 ms of Python on a
        # CPU, as much as a small network's whole step, so the hot path only hands the step's values
        # to EpochMeans (summed on the device, logged once per epoch by EpochTrainingMetrics), and step
        # values are logged only on the steps that the loggers write (every trainer.log_every_n_steps),
        # plus the loss on every step when a progress bar shows it. Accuracy goes in as the per-sample
        # hits (argmax and compare, no grad: argmax's output has none), summed with the rest later.
        hits = logits.argmax(dim=-1) == labels
        self.train_means.update({**{f"{prefix}{name}_epoch": value for name, value in losses.items()},
                                 f"{prefix}acc": hits}, batch_size)
        written = self._writes_step_logs()
        # (prog_bar only with a progress bar: Lightning turns progress-bar values into Python numbers
        # after every batch, a device-to-host copy, for as long as they stay logged)
        progress_bar = self._trainer is not None and self._trainer.progress_bar_callback is not None
        if written or progress_bar:
            for name, value in losses.items():
                if written or name == "loss":
                    self.log(f"{prefix}{name}_step", value.detach(), on_step=True, on_epoch=False,
                             prog_bar=progress_bar and name == "loss", batch_size=batch_size)
        return loss

    def _writes_step_logs(self) -> bool:
        """Whether the loggers write step values after this training step (Lightning's own test)."""
        if self._trainer is None:
            return True
        return writes_step_logs(self.trainer)

    def log_train_epoch_metrics(self) -> None:
        """Logs the epoch means of the loss parts (``train/<part>_epoch``) and the accuracy (``train/acc``).

        The sums are reduced over processes once, here (a single collective per epoch); the means are
        weighted by batch size, as Lightning's ``on_epoch`` means, so ``train/acc`` is the fraction
        of the epoch's training images classified correctly (micro top-1 accuracy).
        """
        for key, mean in self.train_means.compute(self.trainer.strategy).items():
            self.log(key, mean, on_step=False, on_epoch=True)

    def _finite(self, loss: Tensor) -> bool:
        """One check of the total per step; under DDP all processes agree (they must skip or stop together).

        A one-element loss is read once (``item``: the same single device-to-host copy as
        ``bool(isfinite(...))``, without the three device ops that cost ~12 µs on a CPU).
        """
        finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def _on_nonfinite(self, losses: dict[str, Tensor], batch_idx: int) -> None:
        if self.nonfinite_loss == "skip":
            self.skipped_nonfinite += 1
            return None  # automatic optimisation: no backward, no optimiser step for this batch
        bad = {name: value.detach().float().mean().item() for name, value in losses.items()
               if not torch.isfinite(value.detach()).all()}
        parts = [name for name in bad if name != "loss"] or list(bad) or ["loss (on another process)"]
        checkpoint = getattr(self._trainer, "checkpoint_callback", None) if self._trainer else None
        last = getattr(checkpoint, "last_model_path", "") or "none written yet"
        described = ", ".join(f"{self.log_prefix}{name} = {bad.get(name, 'non-finite')}" for name in parts)
        raise NonFiniteLossError(
            f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{batch_idx}): {described}. "
            f"The last good checkpoint is kept ({last}). Lower the learning rate or check the data; "
            "`--nonfinite_loss skip` skips such batches instead."
        )

    def on_train_epoch_end(self) -> None:
        if self.nonfinite_loss == "skip":
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=False, on_epoch=True)

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> None:
        images, labels, indices = batch
        logits = self.active_network()(images)
        batch_size = images.shape[0]
        prefix = f"{self.log_prefix}{stage}"
        getattr(self, f"{stage}_loss")(nn.functional.cross_entropy(logits.float(), labels), batch_size)
        getattr(self, f"{stage}_acc")(logits, labels)
        self.log(f"{prefix}/loss", getattr(self, f"{stage}_loss"), batch_size=batch_size)
        self.log(f"{prefix}/acc", getattr(self, f"{stage}_acc"), prog_bar=stage == "val", batch_size=batch_size)
        if self.top5:
            getattr(self, f"{stage}_acc_top5")(logits, labels)
            self.log(f"{prefix}/acc_top5", getattr(self, f"{stage}_acc_top5"), batch_size=batch_size)
        if self.active_teacher() is not None:
            cached = self.eval_teacher_logits.get(stage)
            reference = (cached[indices.cpu()].to(logits.device) if cached is not None
                         else self.teacher_logits(images))
            getattr(self, f"{stage}_agreement")(top1_agreement(logits, reference))
            getattr(self, f"{stage}_kl")(soft_target_kl(logits, reference))
            self.log(f"{prefix}/agreement", getattr(self, f"{stage}_agreement"), batch_size=batch_size)
            self.log(f"{prefix}/kl", getattr(self, f"{stage}_kl"), batch_size=batch_size)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        accuracy = self.val_acc.compute()
        self.last_validation = (self.global_step, accuracy)
        self.val_acc_best(accuracy)
        best = self.val_acc_best.compute()
        self.log(f"{self.log_prefix}val/acc_best", best, sync_dist=True)
        self.log("hp_metric", best, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.active_network()(images).softmax(dim=-1)

    # ----------------------------------------------------------------------------------- optimisation
    def trainable_modules(self) -> list[nn.Module]:
        """The modules whose parameters the optimiser updates (never the teacher)."""
        return [self.student]

    def configure_optimizers(self) -> Any:
        params = [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = self.optimizer_factory(params)
        # Before the scheduler exists, so that it takes the scaled rate as its base rate.
        scale_learning_rates(self._trainer, optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.hparams.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/acc"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Called on every step with the Trainer's gradient_clip_val; without one Lightning's
        # clip_gradients only validates its arguments and clips at 0, i.e. not at all.
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers()
        optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
        self.log("lr", optimizer.param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = [TrainingThroughput(), EpochTrainingMetrics(), RunGuard()]
        # The method's checkpointing, unless the user configured a monitored checkpoint of their own.
        if not any(c.monitor for c in self.trainer.checkpoint_callbacks):
            callbacks.append(self.checkpoint_callback())
        return callbacks

    def checkpoint_callback(self) -> ModelCheckpoint:
        """Model selection on validation accuracy, plus ``last.ckpt`` for resuming."""
        return EpochCheckpoint(monitor="val/acc", mode="max", save_last=True,
                               filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)

    # ----------------------------------------------------------------------------------- evaluation
    def evaluation_stages(self) -> list[str]:
        """Names of the networks a staged method tests one by one at the end of ``fit`` (none here)."""
        return []

    def select_stage(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- export
    def student_network(self) -> nn.Module:
        """The trained network as a plain module, for export and for use as a teacher."""
        return self.student


def check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


class EpochCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` without its per-batch costs when it saves at epoch ends only.

    With neither ``every_n_train_steps`` nor ``train_time_interval`` set, ``ModelCheckpoint`` decides
    on every training batch not to save (about 50 µs of Python a step on a CPU), and Lightning asks
    for its ``state_key`` (the repr of a dict) around every hook call. Here the first returns at once
    in that case and the second is computed once; the key is ``ModelCheckpoint``'s own, so
    checkpoints written with either class resume with the other.
    """

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:
            key = ModelCheckpoint.state_key.fget(self)  # type: ignore[attr-defined]
            key = self.__dict__["_state_key"] = "ModelCheckpoint" + key[len(type(self).__qualname__):]
        return key

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._every_n_train_steps >= 1 or self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class TrainingThroughput(Callback):
    """Training images per second, measured over the training loop only (validation excluded).

    Counted over all processes (global batch), so the figure is comparable across device counts.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._started: float | None = None
        self.fit_started: float | None = None  # wall clock at fit start, for results' wall_time_s
        #: Fit time of the earlier segments of a resumed run, up to the checkpoint it resumed from.
        self.previous_wall_s = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trim_loop_overhead(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started = time.time()

    def _resume(self) -> None:
        self._started = time.perf_counter()

    def _pause(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resume()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._resume()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._started is None:  # a run resumed mid-epoch has no epoch start
            self._resume()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.images += batch[0].shape[0] * trainer.world_size

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        wall = self.previous_wall_s + (time.time() - self.fit_started if self.fit_started else 0.0)
        return {"images": self.images, "seconds": self.seconds, "wall_s": wall}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images = state_dict["images"]
        self.seconds = state_dict["seconds"]
        self.previous_wall_s = state_dict.get("wall_s", 0.0)


class EpochMeans:
    """Batch-size-weighted means over an epoch of tensors kept on their device (no sync, no per-step device op).

    ``update`` only keeps (detached) references to the step's values; every :attr:`fold_every` updates,
    and at :meth:`compute`, each key's pending values are summed in one stacked op. Adding each value
    as it comes would cost a device op per value and step (~4 µs each on a CPU, where a small
    network's whole step takes a few milliseconds). A scalar value counts with the update's weight (the
    batch size); a 1-D value holds one entry per sample (e.g. correct or not) and counts with its sum.
    """

    fold_every = 64

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self._pending: list[tuple[dict[str, Tensor], int]] = []

    def update(self, values: dict[str, Tensor], weight: int) -> None:
        self._pending.append(({key: value.detach() for key, value in values.items()}, weight))
        self.count += weight
        if len(self._pending) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        for key in dict.fromkeys(key for values, _ in pending for key in values):
            entries = [(values[key], weight) for values, weight in pending if key in values]
            first = entries[0][0]
            if first.dim() == 0:
                stacked = torch.stack([value.float() for value, _ in entries])
                weights = torch.tensor([weight for _, weight in entries], dtype=torch.float32)
                total = (stacked * weights.to(stacked.device, non_blocking=True)).sum()
            else:
                total = torch.cat([value.reshape(-1) for value, _ in entries]).float().sum()
            self.sums[key] = self.sums[key] + total if key in self.sums else total

    def compute(self, strategy: Any = None) -> dict[str, Tensor]:
        """The means (reduced over processes with ``strategy.reduce``), and a reset for the next epoch."""
        self._fold()
        if not self.sums:
            self.count = 0
            return {}
        keys = list(self.sums)
        totals = torch.stack([self.sums[k] for k in keys] + [torch.full_like(self.sums[keys[0]], self.count)])
        if strategy is not None:
            totals = strategy.reduce(totals, reduce_op="sum")
        self.sums, self.count = {}, 0
        return {key: totals[i] / totals[-1] for i, key in enumerate(keys)}


class EpochTrainingMetrics(Callback):
    """Logs the method's epoch means of the training losses and its training accuracy at each epoch's end.

    A callback rather than the module's ``on_train_epoch_end``, so that methods overriding that hook
    cannot lose these metrics.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, DistillModule):
            pl_module.log_train_epoch_metrics()


_presign_training_step(DistillModule)

__all__ = ["DistillModule", "EpochCheckpoint", "TrainingThroughput", "EpochTrainingMetrics", "EpochMeans", "check_label_smoothing"]
