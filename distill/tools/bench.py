"""Throughput benchmark: each method's real training step against the cost of its parts.

``python benchmarks/throughput.py --quick`` (or ``distill bench --quick``) prints a table and, with
``--json PATH``, writes one record per measurement. Kinds of measurement:

* ``step``: a method's training step, run by a minimal ``lightning.Trainer`` (no logger, no
  checkpoints, no validation) on batches already in memory on the device, so ``self.log``, our
  callbacks and Lightning's automatic optimisation all run as in a real fit. Interleaved with it, in
  the same process and on the same networks, batches and precision, the **bound**, of one of two kinds
  (the record's ``bound`` field, the table's ``bound`` column):

  - ``"plain torch"`` (the rows with a hand-written bound): the same computation in plain torch,
    nothing of Lightning and none of our bookkeeping (metrics, logging, the non-finite check, per-step
    seeding).
  - ``"method step"`` (:func:`method_step_bound`, the generic row of every other method): the method's
    own ``training_losses`` called on the batch outside Lightning, then backward and the optimiser
    step. It is not an independent reimplementation: whatever ``training_losses`` itself computes (a
    part computed only to be logged, say) is in the bound too, so ``ratio`` measures only what
    Lightning's loop and our ``training_step`` bookkeeping add around that method's losses.

  A plain-torch bound does per step (:class:`Bound`, built by the row's ``MethodBench.bound``): the
  on-device augmentation if the method augments inside its step (PatientConsistentKD's crops, flips and
  mixup; other methods augment in the DataLoader, outside the step), the teacher's forward pass under
  ``inference_mode`` (or, with a teacher cache, the lookup of its logits), the trained network's forward
  pass, the method's loss (the functions of :mod:`distill.losses`, ResidualKD's ``feature_mse``),
  backward, the recipe's gradient clipping (if any), and the step of the method's own optimiser and
  per-step schedule, the very objects the Trainer built from its ``configure_optimizers`` (SGD with
  momentum and weight decay by default; PatientConsistentKD's AdamW, warm-up/cosine schedule and norm
  clipping at 1); a ``"method step"`` bound steps those same objects too. ``ratio`` is the share of the
  bound the method reaches: the median, over ``--repeats`` alternating measurements, of (method
  images/s) / (bound images/s) measured back to back; ``images_per_s`` and ``bound_images_per_s`` are
  the medians of each. ``floor_ratio`` is the same ratio for :class:`LightningFloor`, a bare
  LightningModule doing only the bound's work in the same kind of Trainer: what Lightning's own loop
  leaves of the bound, against which ``ratio`` shows what our bookkeeping adds.
  With ``--device-ops STEPS`` a step row also counts the operators dispatched per step by the method, its floor
  and its bound (:func:`measure_device_ops`, :mod:`distill.tools.device_ops`): exact, where the timings scatter.
* ``fit``: the full loop, ``Trainer.fit`` with the real :class:`~distill.data.DistillDataModule`,
  training only, and the share of its time spent waiting for data (:class:`DataWait`).
* ``ddp``: ``distill fit`` in a subprocess with 1 and 2 CPU processes (``train_images_per_s`` of
  its ``results.json``).

Methods plug in through the registry, :data:`distill.methods.METHODS`: :data:`ROWS` has, in the
registry's order, the rows of :data:`SPECIAL_ROWS` for the methods measured in several settings or
stages or with a hand-written plain-torch bound (Supervised, BaselineKD and its teacher cache, each
TeacherAssistantKD and ResidualKD stage, each PatientConsistentKD teaching), and one generic row
(:func:`generic_row`, bound ``"method step"``) for every other method, so a new method is benchmarked
without an edit here. Each row is a :class:`MethodBench` saying how to build the module from a
:class:`BenchContext` and what its bound computes; the step itself is always the module's own
``training_step``. A method that needs a setting, stage or plain-torch bound of its own adds an entry
to :data:`SPECIAL_ROWS`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from distill import teacher_cache
from distill.errors import DataNotFoundError
from distill.losses import hinton_kd_objective, kd_loss
from distill.methods import (METHODS, BaselineKD, DistillModule, PatientConsistentKD, ResidualKD, Supervised,
                             TeacherAssistantKD, TeacherStudentModule, TrainingBatch)
from distill.methods.residual_kd import feature_mse
from distill.run import child_environment
from distill.callbacks import apply_speed_options
from distill.teachers import NetworkSpec, save_network
from distill.tools.device_ops import CountStepOperators, count_per_step

REQUIRED_KEYS = ("method", "teacher", "student", "batch_size", "device", "precision", "images_per_s",
                 "bound_images_per_s", "ratio", "peak_memory_mb")


# ------------------------------------------------------------------------------------- what is run
@dataclass(frozen=True)
class Pair:
    """A teacher → student pair (with an assistant for TAKD) and the input it trains on."""

    name: str
    teacher: str
    student: str
    assistant: str
    image_size: int
    in_channels: int = 3
    num_classes: int = 100
    gpu_only: bool = False


PAIRS: dict[str, Pair] = {pair.name: pair for pair in (
    Pair("mnist5k_mlp", "mlp_1200_1200", "mlp_800_800", "mlp_300_300", 28, 1, 10),
    Pair("resnet32x4_resnet8x4", "resnet32x4", "resnet8x4", "wrn_40_2", 32),
    Pair("resnet56_resnet20", "resnet56", "resnet20", "resnet32", 32),
    Pair("bit_r152x2_r50_128", "timm.resnetv2_152x2_bit", "timm.resnetv2_50x1_bit", "timm.resnetv2_101x1_bit",
         128, 3, 1000, gpu_only=True),
    Pair("bit_r152x2_r50_224", "timm.resnetv2_152x2_bit", "timm.resnetv2_50x1_bit", "timm.resnetv2_101x1_bit",
         224, 3, 1000, gpu_only=True),
    # for tests and smoke runs
    Pair("tiny_mlp", "mlp_300_300", "mlp_30_30", "mlp_30_30", 8, 1, 10),
)}


@dataclass
class BenchContext:
    """What a method's builder gets: the pair, a scratch directory, and saved (random) teacher/assistant files.

    ``batches`` are the in-memory ``(images, labels, indices)`` batches the step is timed on (indices
    are distinct over them), for builders that precompute per-sample data such as a teacher cache.
    """

    pair: Pair
    workdir: Path
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def network_file(self, role: str) -> str:
        """A randomly initialised ``role`` network (``teacher``/``assistant``) saved as a teacher file."""
        path = self.workdir / f"{self.pair.name}-{role}.safetensors"
        if not path.exists():
            name = getattr(self.pair, role)
            spec = NetworkSpec(name, self.pair.num_classes, self.pair.in_channels, self.pair.image_size)
            save_network(spec.build(), spec, path)
        return str(path)

    @property
    def geometry(self) -> dict[str, int]:
        return dict(num_classes=self.pair.num_classes, in_channels=self.pair.in_channels,
                    image_size=self.pair.image_size)


@dataclass
class Bound:
    """What a row's plain-torch bound does per step besides the optimiser: ``loss(batch)`` (the forward
    passes of the method's recipe, its on-device augmentation and its loss), then backward and
    ``clip_norm`` (if the recipe clips). :class:`PlainStep` adds the step of the method's own optimiser
    and per-step schedules. Nothing of Lightning, our metrics, logging, checks or seeding."""

    loss: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
    clip_norm: float | None = None


def _frozen_forward(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return network(images)


def supervised_bound(module: DistillModule) -> Bound:
    """Cross-entropy training of the student."""
    student, smoothing = module.active_network(), module.hparams.label_smoothing

    def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(student(batch[0]).float(), batch[1], label_smoothing=smoothing)
    return Bound(loss)


def kd_bound(module: DistillModule) -> Bound:
    """Hinton KD of the trained network from its teacher's forward pass (BaselineKD, a TAKD stage), or
    from the cached teacher logits looked up by index (``cached_logits``)."""
    student, teacher = module.active_network(), module.active_teacher()
    cached: torch.Tensor | None = getattr(module, "cached_logits", None)
    stage = getattr(module, "stage", None)
    if isinstance(module, TeacherAssistantKD):
        settings = dict(temperature=module.stage_temperature[stage], alpha=module.stage_alpha[stage])
    else:
        hp = module.hparams
        settings = dict(temperature=hp.temperature, alpha=hp.alpha, label_smoothing=hp.label_smoothing)

    def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, indices = batch
        logits = student(images)  # before the teacher, as in the methods' steps
        target = cached[indices] if cached is not None else _frozen_forward(teacher, images)
        return hinton_kd_objective(logits, target, labels, **settings)["loss"]
    return Bound(loss)


def residual_bound(module: DistillModule) -> Bound:
    """ResidualKD (M.1): the teacher's final feature map; stage 1: S (and its connector) matched to it;
    stage 2: A matched to the residual of the frozen S."""
    pair, teacher, stage = module.student, module.teacher, module.stage_name

    def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images = batch[0]
        with torch.inference_mode():
            target = teacher.forward_features(images)[-1]
        if stage == "student":
            return feature_mse(pair.student_feature(images), target)
        with torch.no_grad():
            target = target - pair.student_feature(images)
        return feature_mse(pair.assistant_feature(images), target)
    return Bound(loss)


def patient_bound(module: DistillModule, generator: torch.Generator | None = None) -> Bound:
    """PatientConsistentKD: the teaching's crops/flips/mixup of the batch on the device (one generator
    for the whole run), the teacher on its view (or the cached logits), τ²·KL, and the recipe's AdamW,
    per-step warm-up/cosine schedule and gradient-norm clipping."""
    generator = generator or torch.Generator().manual_seed(0)
    temperature, cached = module.hparams.temperature, module.cached_logits

    def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, _, indices = batch
        views = module.make_views(images, generator)
        target = cached[indices] if views.teacher is None else _frozen_forward(module.teacher, views.teacher)
        return kd_loss(module.student(views.student), target, temperature)
    return Bound(loss, clip_norm=module.hparams.grad_clip_norm or None)


def method_step_bound(module: DistillModule) -> Bound:
    """The generic bound: the method's own ``training_losses`` on the batch (as a :class:`TrainingBatch`,
    its batch index counting the bound's steps), called outside Lightning; :class:`PlainStep` adds
    backward and the step of the method's optimiser and per-step schedule.

    Not a plain-torch reimplementation of the method: it calls the very code the method's step calls,
    so what it leaves out is only Lightning's loop and our ``training_step`` bookkeeping (metrics,
    logging, the non-finite check), and ``ratio`` measures that overhead for this method. It does not
    clip (the default recipe does not; a method whose recipe clips needs a row in :data:`SPECIAL_ROWS`).
    """
    steps = itertools.count()

    def loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, indices = batch
        return module.training_losses(TrainingBatch(images, labels, indices, next(steps)))[1]["loss"]
    return Bound(loss)


#: :attr:`MethodBench.bound_kind` of the hand-written bounds and of :func:`method_step_bound`.
PLAIN_TORCH, METHOD_STEP = "plain torch", "method step"


@dataclass(frozen=True)
class MethodBench:
    """One row of the step benchmark.

    Args:
        build: makes the module, in the state whose step is measured (e.g. a TAKD stage).
        bound: the row's bound, from the built module (see :class:`Bound`).
        teacher_role: which network of the pair teaches (``teacher``/``assistant``), for the table; None: none.
        student_role: which network of the pair is trained.
        bound_kind: what the bound is, for the table and records: ``"plain torch"`` (a hand-written
            computation of the method's recipe) or ``"method step"`` (:func:`method_step_bound`).
    """

    build: Callable[[BenchContext], DistillModule]
    bound: Callable[[DistillModule], Bound]
    teacher_role: str | None = "teacher"
    student_role: str = "student"
    bound_kind: str = PLAIN_TORCH


def _takd_stage(stage: str) -> Callable[[BenchContext], DistillModule]:
    # One assistant; a supplied assistant file skips its stage, so the module starts in the student's.
    def build(context: BenchContext) -> DistillModule:
        supplied = stage == "student"
        return TeacherAssistantKD(
            student=context.pair.student, assistants=[context.pair.assistant],
            stage_epochs=[0, 10**6] if supplied else [10**6, 1],
            assistant_checkpoints=[context.network_file("assistant") if supplied else None],
            teacher=context.network_file("teacher"), **context.geometry)
    return build


def _cached_kd(context: BenchContext) -> DistillModule:
    # The teacher's outputs for the benchmark's batches, computed once as the cache would hold them.
    module = BaselineKD(student=context.pair.student, teacher=context.network_file("teacher"), **context.geometry)
    module.cached_logits = _teacher_outputs(module, context)
    return module


def _residual_stage(stage: int) -> Callable[[BenchContext], DistillModule]:
    # The module pinned to one stage (stage 1 trains S, stage 2 trains A with S frozen). S is the pair's
    # student and A the same network at a quarter of its width (given, not derived: derivation needs a
    # student large enough to pay for connectors to the teacher's map, which the tiny test pair is not).
    def build(context: BenchContext) -> DistillModule:
        class Pinned(ResidualKD):
            def _stage_for_epoch(self, epoch: int) -> int:
                return stage

        # a small learning rate: feature matching between random networks on noise diverges at larger ones
        module = Pinned(student=context.pair.student, stage_epochs=[10**6, 10**6], teacher=context.network_file("teacher"),
                        assistant=context.pair.student, assistant_kwargs={"width": 0.25}, **context.geometry,
                        optimizer=lambda params, **options: torch.optim.SGD(params, lr=1e-5, momentum=0.9,
                                                                             weight_decay=5e-4, **options))
        module.enter_stage(stage)
        return module
    return build


def _patient(teaching: str) -> Callable[[BenchContext], DistillModule]:
    def build(context: BenchContext) -> DistillModule:
        module = PatientConsistentKD(student=context.pair.student, teacher=context.network_file("teacher"), teaching=teaching,
                                     warmup_steps=1, **context.geometry)
        if teaching == "fixed":  # the cache as on_fit_start would load it
            module.cached_logits = _teacher_outputs(module, context)
        return module
    return build


def _teacher_outputs(module: DistillModule, context: BenchContext) -> torch.Tensor:
    # the cache's own computation, on the benchmark's batches (their indices are distinct), by the teacher on their
    # device; the logits end there too, as on_fit_start holds them (the module's later .to() moves no plain tensor
    # attribute). Computed on a CPU teacher, it failed on CUDA: CUDA images into CPU weights.
    device = context.batches[0][0].device
    module.to(device)
    size = sum(len(indices) for _, _, indices in context.batches)
    return teacher_cache.compute(context.batches, module.teacher_logits, size, device).to(device)


#: The rows of the methods that are measured in several settings or stages, or against a hand-written
#: plain-torch bound of what that setting must compute, by method name (in the registry,
#: :data:`distill.methods.METHODS`); each replaces the method's generic row, in table order.
#: ``BaselineKD+cache`` looks the teacher's logits up (``cache_teacher_outputs``), so its bound has no
#: teacher forward either.
SPECIAL_ROWS: dict[str, dict[str, MethodBench]] = {
    "Supervised": {
        "Supervised": MethodBench(lambda c: Supervised(student=c.pair.student, **c.geometry), supervised_bound,
                                  teacher_role=None),
    },
    "BaselineKD": {
        "BaselineKD": MethodBench(lambda c: BaselineKD(student=c.pair.student, teacher=c.network_file("teacher"),
                                                       **c.geometry), kd_bound),
        "BaselineKD+cache": MethodBench(_cached_kd, kd_bound),
    },
    "TeacherAssistantKD": {
        "TeacherAssistantKD/ta1": MethodBench(_takd_stage("ta1"), kd_bound, student_role="assistant"),
        "TeacherAssistantKD/student": MethodBench(_takd_stage("student"), kd_bound, teacher_role="assistant"),
    },
    "ResidualKD": {
        "ResidualKD/student": MethodBench(_residual_stage(0), residual_bound),
        "ResidualKD/assistant": MethodBench(_residual_stage(1), residual_bound),
    },
    "PatientConsistentKD": {
        f"PatientConsistentKD/{teaching}": MethodBench(_patient(teaching), patient_bound)
        for teaching in ("fixed", "independent", "consistent", "function_matching")
    },
}


def generic_row(cls: type[DistillModule]) -> MethodBench:
    """The row of a method without special rows: the method with its defaults on the pair's student
    (and teacher file, for a :class:`~distill.methods.TeacherStudentModule`), against the
    ``"method step"`` bound (:func:`method_step_bound`)."""
    teaches = issubclass(cls, TeacherStudentModule)

    def build(context: BenchContext) -> DistillModule:
        teacher = dict(teacher=context.network_file("teacher")) if teaches else {}
        return cls(student=context.pair.student, **teacher, **context.geometry)
    return MethodBench(build, method_step_bound, teacher_role="teacher" if teaches else None, bound_kind=METHOD_STEP)


def method_rows(methods: dict[str, type[DistillModule]] = METHODS) -> dict[str, MethodBench]:
    """The rows of ``methods`` (a registry), in its order: a method's :data:`SPECIAL_ROWS` if it has
    any, else its :func:`generic_row`."""
    rows: dict[str, MethodBench] = {}
    for name, cls in methods.items():
        rows.update(SPECIAL_ROWS.get(name) or {name: generic_row(cls)})
    return rows


#: Every row of the step benchmark, in table order (``--methods`` takes these names).
ROWS: dict[str, MethodBench] = method_rows()


# ------------------------------------------------------------------------------------- measuring
def make_batches(pair: Pair, batch_size: int, count: int, device: torch.device,
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, pair.in_channels, pair.image_size, pair.image_size)
    return [(torch.randn(shape, generator=generator).to(device),
             torch.randint(0, pair.num_classes, (batch_size,), generator=generator).to(device),
             torch.arange(k * batch_size, (k + 1) * batch_size).to(device)) for k in range(count)]


class _Cycle(torch.utils.data.Dataset):
    """``length`` items cycling through prepared batches.

    The step rows give it to the Trainer as it is, an iterable of batches already in memory, as
    device-resident training gives its :class:`~distill.data.resident.DeviceResidentLoader`: they time
    the training step, and a DataLoader around in-memory batches would add its own per-batch work
    (sampler, fetch, profiler record: tens of µs on a CPU) that no training run with resident data
    does. The fit rows time the real loaders.
    """

    def __init__(self, batches: list, length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batches[index % len(self.batches)]

    def __iter__(self) -> Any:
        return (self.batches[index % len(self.batches)] for index in range(self.length))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimised_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class PlainStep:
    """Runs a row's :class:`Bound` in plain torch: the loss under the row's autocast, then
    ``zero_grad(set_to_none=True)``, backward, clipping, and the step of the method's own optimiser and
    per-step schedules (:meth:`setup`)."""

    def __init__(self, bound: Bound, device: torch.device, precision: str) -> None:
        self.bound, self.device, self.precision = bound, device, precision
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedulers: list[Any] = []
        self.params: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer) -> None:
        """Takes the optimiser and per-step schedules that the Trainer built from the method's
        ``configure_optimizers``: the bound steps the same torch objects (without Lightning's wrappers),
        so that its optimiser works on the same state as the method's. The cost of an update can depend
        on that state: AdamW's square root of a second moment that is exactly zero (a unit that never
        got a gradient) is many times slower than of other values on this CPU, and a second optimiser
        started later sees more such zeros. The bound's steps advance the schedule as well."""
        self.optimizer = trainer.optimizers[0]
        self.schedulers = [config.scheduler for config in trainer.lr_scheduler_configs if config.interval == "step"]
        self.params = optimised_parameters(self.optimizer)

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> None:
        bound, optimizer = self.bound, self.optimizer
        assert optimizer is not None, "PlainStep.setup(trainer) first"
        with _autocast(self.device, self.precision):
            loss = bound.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if bound.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, bound.clip_norm)
        optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()

    def seconds(self, batches: list, steps: int) -> float:
        _sync(self.device)
        started = time.perf_counter()
        for step in range(steps):
            self(batches[step % len(batches)])
        _sync(self.device)
        return time.perf_counter() - started


class Interleave(Callback):
    """Times chunks of ``steps`` training steps inside ``fit`` and, after each, ``steps`` bound steps.

    The first ``warmup`` steps (and one warm-up chunk of the bound) are not timed.
    """

    def __init__(self, bound: PlainStep, batches: list, warmup: int, steps: int, device: torch.device) -> None:
        self.bound, self.batches, self.warmup, self.steps, self.device = bound, batches, warmup, steps, device
        self.method_s: list[float] = []
        self.bound_s: list[float] = []
        self._started = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if hasattr(self.bound, "setup"):
            self.bound.setup(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= self.warmup and (batch_idx - self.warmup) % self.steps == 0:
            _sync(self.device)
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self.bound.seconds(self.batches, self.warmup)
        elif batch_idx >= self.warmup and (batch_idx - self.warmup + 1) % self.steps == 0:
            _sync(self.device)
            self.method_s.append(time.perf_counter() - self._started)
            self.bound_s.append(self.bound.seconds(self.batches, self.steps))


class LightningFloor(L.LightningModule):
    """A row's bound as a bare LightningModule: Lightning's loop around the bound's work and nothing else.

    Its ``training_step`` returns the bound's loss, it clips as the bound does, and it trains the
    method's networks (a child module, so Lightning's ``train()`` reaches them and the method keeps its
    frozen networks in eval mode) with the optimiser and schedules the method's Trainer built, whose
    state simply continues. None of our bookkeeping or callbacks run. Timed against the same bound, it
    gives ``floor_ratio``: the share of the bound that Lightning's automatic-optimisation loop itself
    leaves, the most a method run by this Trainer can be expected to reach.
    """

    def __init__(self, method: DistillModule, bound: Bound, trainer: L.Trainer) -> None:
        super().__init__()
        self.method = method
        self.bound_loss, self.clip_norm = bound.loss, bound.clip_norm
        self.built = ([trainer.optimizers[0]],
                      [{"scheduler": c.scheduler, "interval": c.interval} for c in trainer.lr_scheduler_configs])

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self.bound_loss(batch)

    def configure_optimizers(self) -> Any:
        return self.built

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(optimised_parameters(optimizer), self.clip_norm)


def _quiet_trainer(device: torch.device, precision: str, **kwargs: Any) -> L.Trainer:
    options = dict(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    options.update(kwargs)
    return L.Trainer(**options)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20


@dataclass
class StepSpec:
    """One step measurement (JSON-serialisable, so it can run in a fresh process)."""

    method: str
    pair: str
    batch_size: int
    device: str
    precision: str = "32-true"
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    channels_last: bool = False
    compile: bool | str = False
    threads: int | None = None
    floor: bool = True
    #: also count the operators a step dispatches, over this many steps (0: not; see measure_device_ops)
    device_ops: int = 0


def measure_step(spec: StepSpec) -> dict[str, Any]:
    """Measures one method row and its bound in this process; returns the JSON record."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device, pair, entry = torch.device(spec.device), PAIRS[spec.pair], ROWS[spec.method]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        batches = make_batches(pair, spec.batch_size, 4, device)
        context = BenchContext(pair, Path(scratch), batches)
        module = entry.build(context)
        apply_speed_options(module, spec.channels_last, spec.compile)
        module.to(device)
        if spec.channels_last:
            batches[:] = [(x.to(memory_format=torch.channels_last), y, i) for x, y, i in batches]
        bound = PlainStep(entry.bound(module), device, spec.precision)
        timer = Interleave(bound, batches, spec.warmup, spec.steps, device)
        total = spec.warmup + spec.steps * spec.repeats
        loader = _Cycle(batches, total)
        trainer = _quiet_trainer(device, spec.precision, max_epochs=-1, max_steps=total, callbacks=[timer],
                                 default_root_dir=scratch)
        trainer.fit(module, train_dataloaders=loader)
        floor_timer = None
        if spec.floor:
            floor_timer = Interleave(bound, batches, spec.warmup, spec.steps, device)
            _quiet_trainer(device, spec.precision, max_epochs=-1, max_steps=total, callbacks=[floor_timer],
                           default_root_dir=scratch).fit(LightningFloor(module, bound.bound, trainer),
                                                         train_dataloaders=loader)
    peak_mb = peak_memory_mb(device)  # before the operator count builds its own module
    operators = measure_device_ops(spec) if spec.device_ops else {}
    images = spec.batch_size * spec.steps
    method_ips = images / statistics.median(timer.method_s)
    bound_ips = images / statistics.median(timer.bound_s)
    floor = {}
    if floor_timer is not None:
        floor = {"floor_images_per_s": round(images / statistics.median(floor_timer.method_s), 2),
                 "floor_ratio": round(_paired_ratio(floor_timer), 4)}
    return {
        "kind": "step", "method": spec.method, "pair": pair.name,
        "teacher": getattr(pair, entry.teacher_role) if entry.teacher_role else None,
        "student": getattr(pair, entry.student_role), "batch_size": spec.batch_size,
        "device": describe_device(device), "precision": spec.precision, "bound": entry.bound_kind,
        "images_per_s": round(method_ips, 2), "bound_images_per_s": round(bound_ips, 2),
        "ratio": round(_paired_ratio(timer), 4), **floor, **operators,
        "peak_memory_mb": round(peak_mb, 1),
        "repeats": spec.repeats, "steps": spec.steps,
        "method_images_per_s_each": [round(images / s, 2) for s in timer.method_s],
        "bound_images_per_s_each": [round(images / s, 2) for s in timer.bound_s],
        "channels_last": spec.channels_last, "compile": spec.compile,
    }


def measure_device_ops(spec: StepSpec) -> dict[str, Any]:
    """Operators dispatched per training step (:mod:`distill.tools.device_ops`), over ``spec.device_ops`` steps
    after two untimed ones, on a freshly built module, eager (no speed options) and at ``32-true`` whatever the
    row's precision (under autocast the count would miss the casts of the teachers' weights, see
    :mod:`distill.tools.device_ops`): the method's step in the Trainer, the :class:`LightningFloor` of its bound,
    and the bound in plain torch. Returns the record's
    ``device_ops_per_step``, ``floor_device_ops_per_step``, ``bound_device_ops_per_step`` and
    ``device_ops_steps``."""
    device, pair, entry = torch.device(spec.device), PAIRS[spec.pair], ROWS[spec.method]
    warmup, steps, precision = 2, spec.device_ops, "32-true"
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        batches = make_batches(pair, spec.batch_size, 4, device)
        module = entry.build(BenchContext(pair, Path(scratch), batches)).to(device)
        loader = _Cycle(batches, warmup + steps + 1)  # the epoch's last step (a loss read) is not counted
        method_count, trainer = count_fit_operators(module, loader, warmup, steps, device, precision, scratch)
        bound = PlainStep(entry.bound(module), device, precision)
        bound.setup(trainer)  # the method's optimiser and schedules, as in the timed rows
        floor_count, _ = count_fit_operators(LightningFloor(module, bound.bound, trainer), loader, warmup, steps,
                                             device, precision, scratch)
        for k in range(warmup):
            bound(batches[k % len(batches)])
        bound_per_step, _ = count_per_step(lambda k: bound(batches[k % len(batches)]), steps)
    return {"device_ops_per_step": round(method_count.per_step(), 2),
            "floor_device_ops_per_step": round(floor_count.per_step(), 2),
            "bound_device_ops_per_step": round(bound_per_step, 2), "device_ops_steps": steps}


def count_fit_operators(module: L.LightningModule, loader: _Cycle, warmup: int, steps: int, device: torch.device,
                        precision: str, scratch: str) -> tuple[CountStepOperators, L.Trainer]:
    """Fits ``module`` on ``loader`` (all its batches) in a quiet Trainer, counting the operators of ``steps`` steps
    after ``warmup``; returns the count and the Trainer."""
    count = CountStepOperators(warmup, steps)
    trainer = _quiet_trainer(device, precision, max_epochs=-1, max_steps=len(loader), callbacks=[count],
                             default_root_dir=scratch)
    trainer.fit(module, train_dataloaders=loader)
    return count, trainer


def _paired_ratio(timer: Interleave) -> float:
    # Each chunk of training steps runs right before its bound chunk, so their ratio cancels the
    # machine's load drifting between repeats; the median of those paired ratios is the row's ratio.
    return statistics.median(b / m for m, b in zip(timer.method_s, timer.bound_s))


def measure_step_isolated(spec: StepSpec) -> dict[str, Any]:
    """:func:`measure_step` in a fresh Python process: a clean peak memory and no state from other rows."""
    command = [sys.executable, "-m", "distill.tools.bench", "--worker", json.dumps(asdict(spec))]
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(default_threads=None))
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker for {spec.method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


class _EmptyStep(L.LightningModule):
    """A one-parameter module: its training step measures Lightning's own per-step cost."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight * batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def seconds(self, batches: list, steps: int) -> float:  # the same step in plain torch
        optimizer = self.configure_optimizers()
        started = time.perf_counter()
        for step in range(steps):
            optimizer.zero_grad()
            self.training_step(batches[step % len(batches)], step).backward()
            optimizer.step()
        return time.perf_counter() - started


def measure_loop_overhead(steps: int = 100, repeats: int = 5) -> dict[str, Any]:
    """Lightning's fixed cost per training step on the CPU: an empty step in a Trainer against plain torch."""
    module, batches = _EmptyStep(), [(torch.ones(8),)]
    timer = Interleave(module, batches, 20, steps, torch.device("cpu"))
    loader = _Cycle(batches, 20 + steps * repeats)
    with tempfile.TemporaryDirectory() as scratch:
        _quiet_trainer(torch.device("cpu"), "32-true", max_epochs=1, callbacks=[timer],
                       default_root_dir=scratch).fit(module, train_dataloaders=loader)
    per_step_ms = statistics.median(m - b for m, b in zip(timer.method_s, timer.bound_s)) / steps * 1000
    return {"kind": "overhead", "method": "Lightning loop, empty step", "pair": "-", "teacher": None,
            "student": None, "batch_size": 8, "device": describe_device(torch.device("cpu")),
            "precision": "32-true", "images_per_s": None, "bound_images_per_s": None, "ratio": None,
            "peak_memory_mb": None, "overhead_ms_per_step": round(per_step_ms, 3)}


# ------------------------------------------------------------------------------------- the full loop
class DataWait(Callback):
    """The share of training time spent waiting for batches.

    Waiting = from the end of one training batch (``on_train_batch_end``), or the epoch's start, to
    the start of the next (``on_train_batch_start``): Lightning fetches the next batch and moves it
    to the device in that gap. Total = from the epoch's start to its last batch's end.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.waiting = 0.0
        self.total = 0.0
        self.images = 0
        self._mark = self._epoch_start = 0.0

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = self._epoch_start = self._now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.waiting += self._now() - self._mark

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark = self._now()
        self.images += batch[0].shape[0]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.total += self._mark - self._epoch_start

    @property
    def share(self) -> float:
        return self.waiting / self.total if self.total else 0.0


@dataclass
class FitSpec:
    dataset: str
    pair: str
    method: str
    batch_size: int
    device: str
    device_resident: bool
    num_workers: int = 0
    data_dir: str = "data"
    steps: int = 30
    epochs: int = 2
    precision: str = "32-true"


def measure_fit(spec: FitSpec) -> dict[str, Any]:
    from distill.data import DistillDataModule

    device, pair, entry = torch.device(spec.device), PAIRS[spec.pair], ROWS[spec.method]
    L.seed_everything(0, verbose=False)
    data = DistillDataModule(dataset=spec.dataset, data_dir=spec.data_dir, batch_size=spec.batch_size,
                             num_workers=spec.num_workers, device_resident=spec.device_resident,
                             persistent_workers=spec.num_workers > 0)
    pair = Pair(pair.name, pair.teacher, pair.student, pair.assistant, data.image_size, data.in_channels,
                data.num_classes)
    with tempfile.TemporaryDirectory() as scratch:
        module = entry.build(BenchContext(pair, Path(scratch)))
        wait = DataWait(device)
        trainer = _quiet_trainer(device, spec.precision, max_epochs=spec.epochs, limit_train_batches=spec.steps,
                                 callbacks=[wait], default_root_dir=scratch)
        data.setup("fit")  # decoding files is setup, not training
        trainer.fit(module, datamodule=data)
    return {
        "kind": "fit", "method": spec.method, "pair": pair.name, "dataset": spec.dataset,
        "teacher": getattr(pair, entry.teacher_role) if entry.teacher_role else None,
        "student": getattr(pair, entry.student_role), "batch_size": spec.batch_size,
        "device": describe_device(device), "precision": spec.precision,
        "images_per_s": round(wait.images / wait.total, 2) if wait.total else None,
        "bound_images_per_s": None, "ratio": None, "peak_memory_mb": round(peak_memory_mb(device), 1),
        "data_wait_share": round(wait.share, 4), "device_resident": spec.device_resident,
        "num_workers": spec.num_workers, "epochs": spec.epochs, "steps_per_epoch": spec.steps,
    }


def measure_ddp(processes: int, batch_size: int, epochs: int, workdir: Path) -> dict[str, Any]:
    """``distill fit`` of BaselineKD on mnist5k (MLP pair) with ``processes`` CPU processes."""
    pair = PAIRS["mnist5k_mlp"]
    teacher = BenchContext(pair, workdir).network_file("teacher")
    command = [sys.executable, "-m", "distill.cli", "fit", "--model", "BaselineKD",
               "--model.student", pair.student, "--model.teacher", teacher, "--data.dataset", "mnist5k",
               "--data.batch_size", str(batch_size), "--trainer.max_epochs", str(epochs),
               "--trainer.accelerator", "cpu", "--trainer.devices", str(processes),
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(workdir / "runs"),
               "--run_name", f"ddp{processes}"]
    if processes > 1:
        command += ["--trainer.strategy", "ddp"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(default_threads=None), cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"distill fit with {processes} processes failed:\n{done.stderr[-3000:]}")
    results = json.loads((workdir / "runs" / f"ddp{processes}" / "latest" / "results.json").read_text())
    return {
        "kind": "ddp", "method": "BaselineKD", "pair": pair.name, "dataset": "mnist5k",
        "teacher": pair.teacher, "student": pair.student, "batch_size": batch_size,
        "device": f"cpu x {processes} processes", "precision": "32-true",
        "images_per_s": results["train_images_per_s"], "bound_images_per_s": None, "ratio": None,
        "peak_memory_mb": None, "processes": processes, "epochs": epochs,
    }


# ------------------------------------------------------------------------------------- the command
def _operators(record: dict[str, Any]) -> str:
    if record.get("device_ops_per_step") is None:
        return ""
    return " / ".join(f"{record[key]:g}" for key in ("device_ops_per_step", "floor_device_ops_per_step",
                                                     "bound_device_ops_per_step"))


def format_table(records: list[dict[str, Any]]) -> str:
    header = ["kind", "pair / data", "method", "batch", "precision", "img/s", "bound", "bound img/s", "ratio",
              "Lightning floor", "ops/step (method / floor / bound)", "peak MB", "data wait"]
    rows = []
    for r in records:
        where = r["pair"] if r["kind"] in ("step", "overhead") else f"{r.get('dataset')}: {r['pair']}"
        if r["kind"] == "fit":
            where += " (resident)" if r["device_resident"] else f" ({r['num_workers']} workers)"
        if r["kind"] == "ddp":
            where += f" ×{r['processes']} proc"
        if r["kind"] == "overhead":
            where = f"{r['overhead_ms_per_step']:.2f} ms per step more than plain torch"
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        rows.append([r["kind"], where, r["method"], str(r["batch_size"]), r["precision"],
                     fmt(r["images_per_s"], ".0f"), r.get("bound") or "", fmt(r["bound_images_per_s"], ".0f"),
                     fmt(r["ratio"], ".3f"),
                     fmt(r.get("floor_ratio"), ".3f"), _operators(r), fmt(r["peak_memory_mb"], ".0f"),
                     fmt(r.get("data_wait_share"), ".1%")])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distill bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="mnist5k MLPs and resnet56→resnet20, 3 repeats of 2 steps, no scaling, full loop or DDP rows")
    parser.add_argument("--pairs", nargs="*", choices=sorted(PAIRS),
                        help="teacher→student pairs of the step rows (none: no step rows)")
    parser.add_argument("--methods", nargs="+", choices=list(ROWS),
                        help="method rows (default: all; one per method of distill.methods.METHODS, or its "
                             "settings and stages)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scaling-batch-sizes", type=int, nargs="*",
                        help="BaselineKD step rows at these batch sizes too (images/s against batch size)")
    parser.add_argument("--repeats", type=int, help="alternating method/bound measurements per row (median)")
    parser.add_argument("--steps", type=int, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, help="untimed steps before the first measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process on CPU (default 1: on a shared or busy machine, "
                             "several OpenMP threads per process make timings erratic); 0 = torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed (GPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default=False, help="torch.compile mode for student and teacher")
    parser.add_argument("--fit", nargs="*", metavar="DATASET", help="full-loop rows: mnist5k, cifar10-jpeg")
    parser.add_argument("--cifar-jpeg-dir", default="data/cifar10-jpeg",
                        help="the CIFAR-10 JPEG copy (ImageFolder layout) for --fit cifar10-jpeg")
    parser.add_argument("--fit-methods", nargs="+", default=["Supervised", "BaselineKD"], choices=list(ROWS),
                        help="methods of the full-loop rows")
    parser.add_argument("--fit-steps", type=int, default=30, help="training batches per epoch of full-loop rows")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the non-resident fit rows")
    parser.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=None,
                        help="distill fit with 1 and 2 CPU processes (default: on unless --quick)")
    parser.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                        help="first row: Lightning's own cost per training step (an empty step), on CPU")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="per step row, also time a bare LightningModule doing only the bound's work in the "
                             "same kind of Trainer (floor_ratio: what Lightning's own loop leaves of the bound)")
    parser.add_argument("--device-ops", type=int, default=0, metavar="STEPS",
                        help="per step row, also count the operators dispatched per step (method, Lightning floor, "
                             "bound; eager, at 32-true) over STEPS steps: 64 spreads the work done every 16 and 64 "
                             "steps exactly (distill.tools.device_ops); 0 (default): no count")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each step row in a fresh process, for a per-row peak memory (default: "
                             "on unless --quick; each process spends seconds importing torch and lightning)")
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    full = not args.quick
    if args.pairs is None:
        args.pairs = (["mnist5k_mlp", "resnet56_resnet20"] if args.quick else
                      ["mnist5k_mlp", "resnet56_resnet20", "resnet32x4_resnet8x4",
                       "bit_r152x2_r50_128", "bit_r152x2_r50_224"])
    args.methods = args.methods or list(ROWS)
    args.repeats = args.repeats or (5 if full else 3)
    args.steps = args.steps or (10 if full else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if full else 1)
    if args.scaling_batch_sizes is None:
        args.scaling_batch_sizes = [32, 128, 256] if full else []
    cifar_here = (Path(args.cifar_jpeg_dir) / "train").is_dir()
    if args.fit is None:
        args.fit = (["mnist5k", "cifar10-jpeg"] if cifar_here else ["mnist5k"]) if full else []
        if full and not cifar_here:
            print(f"(no cifar10-jpeg full-loop rows: no CIFAR-10 JPEG copy at {args.cifar_jpeg_dir}; "
                  "--cifar-jpeg-dir names another)", file=sys.stderr)
    elif "cifar10-jpeg" in args.fit and not cifar_here:  # found now, not after an hour of step rows
        raise DataNotFoundError(f"--fit cifar10-jpeg needs the CIFAR-10 JPEG copy (ImageFolder layout, train/ and "
                                f"test/) at {args.cifar_jpeg_dir}: unpack it there (mkdir -p data && tar -xzf "
                                "cifar10-jpeg.tar.gz -C data), name it with --cifar-jpeg-dir, or leave cifar10-jpeg out "
                                "of --fit.")
    if args.ddp is None:
        args.ddp = full
    if args.isolate is None:
        args.isolate = full
    return args


def run(args: argparse.Namespace, failures: list[str]) -> list[dict[str, Any]]:
    """The measurements ``args`` ask for. A step row that fails (e.g. its loss turns non-finite) is
    reported on stderr and in ``failures`` and the run goes on: one row must not cost a long run's others."""
    device = torch.device(args.device)
    measure = measure_step_isolated if args.isolate else measure_step
    records: list[dict[str, Any]] = []

    def add(record: dict[str, Any]) -> None:
        records.append(record)
        print(format_table([record]).splitlines()[-1], flush=True)

    def step(method: str, pair: str, batch_size: int) -> None:
        try:
            add(measure(StepSpec(method, pair, batch_size, args.device, args.precision, args.steps, args.warmup,
                                 args.repeats, args.channels_last, args.compile, torch.get_num_threads(),
                                 args.floor, args.device_ops)))
        except Exception as error:  # noqa: BLE001 - any row's failure is reported, the rest still run
            last = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            failures.append(f"{method} on {pair}, batch {batch_size}: {type(error).__name__}: {last}")
            print(f"(step row failed: {failures[-1]})", file=sys.stderr, flush=True)

    print(format_table([]))
    if device.type == "cpu" and args.overhead:
        add(measure_loop_overhead())
    for pair in args.pairs:
        if PAIRS[pair].gpu_only and device.type != "cuda":
            print(f"(skipping {pair}: GPU only)", file=sys.stderr)
            continue
        for method in args.methods:
            step(method, pair, args.batch_size)
        for batch_size in args.scaling_batch_sizes:
            if "BaselineKD" in args.methods and batch_size != args.batch_size:
                step("BaselineKD", pair, batch_size)
    for dataset in args.fit:
        data = dict(dataset="mnist5k") if dataset == "mnist5k" else dict(dataset="imagefolder",
                                                                          data_dir=args.cifar_jpeg_dir)
        pair = "mnist5k_mlp" if dataset == "mnist5k" else "resnet32x4_resnet8x4"
        for method in args.fit_methods:
            for resident in (False, True):
                record = measure_fit(FitSpec(**data, pair=pair, method=method, batch_size=args.batch_size,
                                             device=args.device, device_resident=resident,
                                             num_workers=0 if resident else args.workers, steps=args.fit_steps,
                                             precision=args.precision))
                add({**record, "dataset": dataset})
    if args.ddp and device.type == "cpu":
        with tempfile.TemporaryDirectory() as scratch:
            for processes in (1, 2):
                add(measure_ddp(processes, args.batch_size, 2, Path(scratch)))
    return records


def environment() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average "
            f"{', '.join(f'{x:.2f}' for x in load)}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the distill fit subprocesses
    if args.worker:  # one isolated step measurement; the record is the last line of stdout
        print(json.dumps(measure_step(StepSpec(**json.loads(args.worker)))))
        return []
    print(environment(), flush=True)
    started = time.perf_counter()
    failures: list[str] = []
    records = run(args, failures)
    print(f"\n{format_table(records)}\n\n{len(records)} measurements in {time.perf_counter() - started:.0f} s; "
          f"{environment()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    if failures:
        print(f"{len(failures)} step row(s) failed; the others are above"
              f"{' and in ' + str(args.json) if args.json else ''}:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return records


if __name__ == "__main__":
    main()
