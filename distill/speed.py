"""Speed options that do not change what a method computes: ``channels_last`` and ``torch.compile``.

They are a Trainer callback rather than arguments of every method, so they apply to every method
(present and future) without each method's signature repeating them::

    trainer:
      callbacks:
        - class_path: distill.speed.SpeedOptions
          init_args: {channels_last: true, compile: default}

or ``--trainer.callbacks+=distill.speed.SpeedOptions --trainer.callbacks.channels_last=true``.

What is always on (no option): the teacher runs under ``torch.inference_mode`` (see
:meth:`distill.methods.DistillModule.teacher_logits`) inside the training step, hence under the
same autocast as the student: in bf16 with ``trainer.precision: bf16-mixed``.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from torch import nn

from distill.errors import ConfigError
from distill.models.base import ClassifierModel

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    * ``compile``: ``nn.Module.compile`` (torch.compile in place) of each network with that mode.
    """
    mode = resolve_compile(compile)
    for network in networks_of(module):
        if channels_last:
            network.to(memory_format=torch.channels_last)
        if mode is not None:
            network.compile(mode=mode)


class _Unprofiled(PassThroughProfiler):
    """Lightning's default "no profiler", without a generator-based context manager per call.

    The Trainer wraps every hook call (of the module, the strategy and each callback: about 90 per
    training step) in ``profiler.profile(name)``; the default profiler's is a ``@contextmanager``
    that records nothing and costs ~1.2 µs a call on a CPU, 0.1 ms a step.
    """

    _none = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return self._none


def trim_loop_overhead(trainer: L.Trainer) -> None:
    """Swaps the Trainer's default no-op profiler for a cheaper no-op (a configured profiler is kept).

    Every :class:`~distill.methods.DistillModule` run does this at setup (through its
    ``TrainingThroughput`` callback).
    """
    if type(trainer.profiler) is PassThroughProfiler:
        unprofiled = _Unprofiled()
        unprofiled.__dict__.update(trainer.profiler.__dict__)  # whatever the Trainer set up on it so far
        trainer.profiler = unprofiled


class SpeedOptions(Callback):
    """Applies :func:`apply_speed_options` to the method's networks when ``fit``/``validate``/``test`` starts.

    Args:
        channels_last: store convolution weights (and so activations) in NHWC memory order.
        compile: ``false`` (default), ``true`` (mode ``default``) or a torch.compile mode
            (``reduce-overhead``, ``max-autotune``, ...). The first steps then include compilation.
    """

    def __init__(self, channels_last: bool = False, compile: bool | str = False) -> None:
        resolve_compile(compile)  # a wrong mode fails when the config is read, not in setup
        self.channels_last = channels_last
        self.compile = compile
        self._applied: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if id(pl_module) not in self._applied:
            apply_speed_options(pl_module, self.channels_last, self.compile)
            self._applied.add(id(pl_module))


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
            - class_path: distill.speed.EvalTeacherCache
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._teacher_keys: dict[int, str] = {}  # id(teacher) -> weights fingerprint, hashed once per teacher

    def _fill(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        from distill import teacher_cache

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
        cache[stage] = logits

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fill(trainer, pl_module, "val")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fill(trainer, pl_module, "test")


__all__ = ["SpeedOptions", "EvalTeacherCache", "trim_loop_overhead", "apply_speed_options", "networks_of",
           "resolve_compile", "COMPILE_MODES"]
