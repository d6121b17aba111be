"""The Trainer callbacks every method can use, named in a config's ``trainer.callbacks``.

* :class:`SpeedOptions` — ``channels_last`` and ``torch.compile`` for every network a method holds.
* :class:`EvalTeacherCache` — the teacher's validation/test logits computed once and reused.
* :class:`LRScaling` — the learning rate scaled with the global batch under DDP (Goyal et al. 2017).
* :class:`TrainingThroughput` and :class:`EpochTrainingMetrics` — added by every method itself
  (:meth:`distill.methods.DistillModule.configure_callbacks`): training images per second for
  ``results.json``, and the epoch means of the training losses.

They are callbacks rather than arguments of every method so that they apply to every method, present
and future, without each method's signature repeating them::

    trainer:
      callbacks:
        - class_path: distill.callbacks.SpeedOptions
          init_args: {channels_last: true, compile: default}
        - class_path: distill.callbacks.LRScaling
          init_args: {rule: linear, base_batch_size: 64}

**Speed options.** What is always on (no option): the teacher runs under ``torch.inference_mode``
(:meth:`distill.methods.TeacherStudentModule.teacher_logits`) inside the training step, hence under the
same autocast as the student: in bf16 with ``trainer.precision: bf16-mixed``.

**Effective batch size and learning-rate scaling.**
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
        - class_path: distill.callbacks.LRScaling
          init_args: {rule: linear, base_batch_size: 64}   # the batch the config's lr was tuned for

or on the command line ``--trainer.callbacks+=distill.callbacks.LRScaling
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

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from safetensors.torch import save_file
from torch import nn
from torch.optim import Optimizer

from distill import teacher_cache
from distill.errors import ConfigError
from distill.models.base import ClassifierModel

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RULES = ("none", "linear")


# ------------------------------------------------------------------------------------------- speed options
def networks_of(module: nn.Module) -> list[nn.Module]:
    """The outermost zoo networks inside ``module``: student, teacher, assistants, whatever the method holds."""
    found: list[nn.Module] = []
    inner: set[int] = set()
    for child in module.modules():
        if id(child) in inner or not isinstance(child, ClassifierModel):
            continue
        found.append(child)
        inner.update(id(m) for m in child.modules())
    return found


def resolve_compile(compile: bool | str) -> str | None:
    """``compile`` as a torch.compile mode, or ``None`` for off; one clear error for a wrong value."""
    if compile is False or compile in ("false", "none", None):
        return None
    if compile is True or compile == "true":
        return "default"
    if compile not in COMPILE_MODES:
        raise ConfigError(f"compile={compile!r} is not one of true, false, {', '.join(COMPILE_MODES)}.")
    return compile


def apply_speed_options(module: nn.Module, channels_last: bool = False, compile: bool | str = False) -> None:
    """Converts every network in ``module`` in place (parameter names unchanged, so checkpoints are too).

    * ``channels_last``: 4-D weights in NHWC order; convolutions then run in NHWC (faster with
      tensor cores on GPUs, for bf16 in particular; on CPUs it depends on the oneDNN kernels: measure).
    * ``compile``: ``nn.Module.compile`` (torch.compile in place) of each network with that mode, for static
      shapes: each batch shape it meets (the training batch, a smaller last batch, the evaluation batches) gets
      its own specialised graph (and CUDA graph), instead of one dynamic-shape graph serving all of them more
      slowly once a second shape has appeared.
    """
    mode = resolve_compile(compile)
    for network in networks_of(module):
        if channels_last:
            network.to(memory_format=torch.channels_last)
        if mode is not None:
            network.compile(mode=mode, dynamic=False)


#: torch.compile modes that replay CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class SpeedOptions(Callback):
    """Applies :func:`apply_speed_options` to the method's networks when ``fit``/``validate``/``test`` starts, and
    asks every optimiser the method builds for its fused kernel.

    Args:
        channels_last: store convolution weights (and so activations) in NHWC memory order.
        compile: ``false`` (default), ``true`` (mode ``default``) or a torch.compile mode
            (``reduce-overhead``, ``max-autotune``, ...). The first steps then include compilation.
        fused_optimizer: build the optimiser with ``fused=True`` (torch's SGD, Adam, AdamW, Adagrad and
            :class:`distill.optim.DecoupledAdamW`): one kernel per update step for all parameters instead of a few
            multi-tensor ones, the same update up to rounding; what remains of a step outside CUDA graphs is launches,
            so this counts. An optimiser without a ``fused`` argument is a :class:`~distill.errors.ConfigError`.
    """

    def __init__(self, channels_last: bool = False, compile: bool | str = False,
                 fused_optimizer: bool = False) -> None:
        # a wrong mode fails when the config is read, not in setup
        self._cuda_graphs = resolve_compile(compile) in CUDA_GRAPH_MODES
        self.channels_last = channels_last
        self.compile = compile
        self.fused_optimizer = fused_optimizer
        self._applied: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if id(pl_module) not in self._applied:
            apply_speed_options(pl_module, self.channels_last, self.compile)
            self._applied.add(id(pl_module))

    def _new_step(self) -> None:
        # A CUDA-graph replay overwrites the previous replay's outputs; marking each step's start tells torch
        # that nothing of the previous step's network outputs is read any more (the steps keep only tensors
        # computed from them), rather than leaving it to guess where an iteration starts.
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._new_step()

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._new_step()

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._new_step()


# ------------------------------------------------------------------------------------------- evaluation cache
class EvalTeacherCache(Callback):
    """Computes the teacher's logits on the validation and test splits once and reuses them.

    The teacher's outputs on the evaluation splits (for the ``val/agreement``, ``val/kl`` and their
    ``test/`` twins) never change: same frozen teacher, same evaluation view. Without this callback they
    are recomputed at every validation pass of every run; with it they come from
    ``<default_root_dir>/teacher_cache/<dataset>-<split>-<key>.safetensors``, keyed like the training
    cache (:mod:`distill.teacher_cache`: the teacher's weights, the view, the split's labels and
    source positions), so every later epoch and every later run with the same teacher and data reads
    them instead. Staged methods change their teacher from stage to stage; the key follows the active
    teacher. The logits are computed under the run's precision (its autocast) from the same
    evaluation batches the steps see, so the metrics are the same as without the cache (up to the
    last bits where the batches differ)::

        trainer:
          callbacks:
            - class_path: distill.callbacks.EvalTeacherCache
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._teacher_keys: dict[int, str] = {}  # id(teacher) -> weights fingerprint, hashed once per teacher

    def _fill(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        teacher = module.active_teacher()
        cache = module.eval_teacher_logits
        cache.pop(stage, None)
        if teacher is None:
            return
        if id(teacher) not in self._teacher_keys:
            self._teacher_keys[id(teacher)] = teacher_cache.module_teacher_fingerprint(module, teacher)
        view = {"view": "evaluation transform", "outputs": f"{type(module).__name__}.teacher_logits",
                "teacher_image_size": module.hparams.get("teacher_image_size"),
                "precision": str(trainer.precision)}

        def outputs(images: torch.Tensor) -> torch.Tensor:
            with trainer.precision_plugin.forward_context():
                return module.teacher_logits(images)

        logits, status, path = teacher_cache.load_for_split(module, stage, view, outputs,
                                                            self._teacher_keys[id(teacher)], cache_dir=self.cache_dir)
        if status != "loaded" and trainer.is_global_zero:
            print(f"EvalTeacherCache: {stage} teacher outputs {path} {status} ({len(logits)} images)")
        cache[stage] = logits.to(module.device)  # looked up by the batches' indices where they are

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fill(trainer, pl_module, "val")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fill(trainer, pl_module, "test")


# ------------------------------------------------------------------------------------------- lr scaling
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


def optimizer_options(trainer: L.Trainer | None) -> dict[str, Any]:
    """Constructor arguments the trainer's :class:`SpeedOptions` adds to every optimiser the method builds:
    ``{"fused": True}`` with ``fused_optimizer``, else none (and none without a trainer)."""
    if trainer is None:
        return {}
    speed = next((c for c in trainer.callbacks if isinstance(c, SpeedOptions)), None)
    return {"fused": True} if speed is not None and speed.fused_optimizer else {}


def scale_learning_rates(trainer: L.Trainer | None, optimizer: Optimizer) -> dict[str, Any] | None:
    """Applies the trainer's :class:`LRScaling` callback to ``optimizer``, if it has one.

    Called by :meth:`DistillModule.configure_optimizers` between building the optimiser and the
    scheduler. Without a trainer (a module used on its own) or without the callback it does nothing.
    """
    if trainer is None:
        return None
    callback = next((c for c in trainer.callbacks if isinstance(c, LRScaling)), None)
    return callback.scale(trainer, optimizer) if callback is not None else None


# ------------------------------------------------------------------------------------------- bookkeeping
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


class EpochTrainingMetrics(Callback):
    """Logs the method's epoch means of the training losses and its training accuracy at each epoch's end.

    A callback rather than the module's ``on_train_epoch_end``, so that methods overriding that hook
    cannot lose these metrics.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log = getattr(pl_module, "log_train_epoch_metrics", None)  # every DistillModule has it
        if log is not None:
            log()


class PredictionWriter(BasePredictionWriter):
    """Writes what ``distill predict`` computed into ``directory``: ``predictions.csv`` (per image: its position
    in the split, its label, the predicted class and its probability) and ``probabilities.safetensors`` (the
    class probabilities of every image, with the positions). Under DDP each process writes its own share
    (``predictions.rank<N>.csv``, ...)."""

    def __init__(self, directory: str | None) -> None:
        super().__init__(write_interval="epoch")
        self.directory = Path(directory or ".")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        outputs = [p for loader in (predictions if predictions and isinstance(predictions[0], list) else [predictions])
                   for p in loader]
        if not outputs:
            return
        probabilities = torch.cat([o["probabilities"].float().cpu() for o in outputs])
        count = len(probabilities)
        indices = torch.cat([o["indices"].cpu() for o in outputs]) if "indices" in outputs[0] else torch.arange(count)
        labels = torch.cat([o["labels"].cpu() for o in outputs]) if "labels" in outputs[0] else None
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.directory.mkdir(parents=True, exist_ok=True)
        confidence, predicted = probabilities.max(dim=1)
        with open(self.directory / f"predictions{suffix}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "label", "predicted", "confidence"])
            for row in range(count):
                writer.writerow([int(indices[row]), "" if labels is None else int(labels[row]), int(predicted[row]),
                                 f"{float(confidence[row]):.6f}"])
        stored = self.directory / f"probabilities{suffix}.safetensors"
        save_file({"probabilities": probabilities.contiguous(), "indices": indices.contiguous()}, str(stored))
        teacher_cache.give_default_mode(stored)


__all__ = ["PredictionWriter", "SpeedOptions", "EvalTeacherCache", "LRScaling", "TrainingThroughput", "EpochTrainingMetrics",
           "apply_speed_options", "networks_of", "resolve_compile", "COMPILE_MODES", "GlobalBatch", "global_batch",
           "lr_factor", "scale_learning_rates", "describe"]
