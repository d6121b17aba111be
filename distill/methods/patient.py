"""PatientConsistentKD: Beyer et al. (2022), "Knowledge distillation: A good teacher is patient and consistent".

Official code: google-research/big_vision, ``trainers/proj/distill/distill.py`` and
``configs/proj/distill/{bit_i1k,bigsweep_flowers_pet,bigsweep_food_sun}.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from distill import augment, teacher_cache
from distill.data import DistillDataModule
from distill.errors import ConfigError
from distill.lightning_private import attached_trainer
from distill.losses import kd_loss
from distill.methods.base import TrainingBatch
from distill.methods.teacher_student import TeacherStudentModule
from distill.optim import DecoupledAdamW, WarmupCosine

TEACHINGS = ("fixed", "independent", "consistent", "function_matching")
FIXED_VIEWS = ("central_crop", "resize", "inception_ensemble")


@dataclass
class Views:
    """What the student and the teacher see for one batch (``teacher`` is None for a fixed teacher)."""

    student: Tensor
    teacher: Tensor | None
    mixup: float | None  # the batch's mixup coefficient a ∈ [0.5, 1], None without mixup


class PatientConsistentKD(TeacherStudentModule):
    """Function matching: ``L = τ²·KL(p_t^τ ‖ p_s^τ)``, batch mean, no label term (labels feed metrics only).

    **Teaching settings** (``teaching``, paper §3 and Figure 3), all with the same loss:

    * ``fixed`` — the teacher's output per training image is computed once (``fixed_view``:
      ``central_crop`` = the evaluation view, paper ``fix/cc``; ``resize`` = the whole training image,
      ``fix/rs``; ``inception_ensemble`` = logits averaged over ``fixed_crops`` inception crops,
      ``fix/ic_ens``) and cached on disk (:mod:`distill.teacher_cache`); the teacher does not run
      during training. The student always sees random inception crops (the paper's ``fix/rs`` and
      ``fix/cc`` give the student a resize / milder crop; narrow ``crop_scale`` to approach those).
    * ``independent`` — teacher and student see independent random crops (and flips) of each image.
    * ``consistent`` — one random crop per image, fed to both.
    * ``function_matching`` (default) — one random crop per image, then mixup of the batch, the
      identical mixed images fed to both.

    **Augmentation** happens here, on the training device, on un-augmented batches (data
    ``augment: none``, optionally ``train_image_size`` larger than ``image_size``):
    :mod:`distill.augment` inception crops (big_vision's: ``crop_scale`` 0.05–1, ``crop_ratio`` 0.75–1.33, TF's
    sampler with 100 attempts; torchvision's 0.08–1 is a different crop) + flip, and
    mixup with one ``a ~ Beta(α, α)`` per batch, ``a = max(a, 1−a)``, partner = the batch rolled by one
    (α = ``mixup_alpha`` = 1, the official ``mixup=dict(p=1.0)``). The student sees ``image_size``
    crops; the teacher the same crops at ``teacher_image_size`` (T384 → S224 in the paper), cropped
    from the original image, not resized from the student's view. Random draws come from a generator
    seeded by ``(global seed, epoch, batch index, global rank)``: a resumed run redraws the same crops,
    DDP ranks draw different ones, gradient accumulation gets a fresh draw per micro-batch.

    **Recipe** (official configs): Adam with default betas, linear warm-up for ``warmup_steps`` then
    cosine decay to 0 at the last step, global gradient-norm clipping at ``grad_clip_norm`` = 1.0
    (unless the Trainer sets its own ``gradient_clip_val``), decoupled weight decay on weights only.
    These are :class:`distill.optim.DecoupledAdamW` (big_vision's update ``−sched(t)·(lr·adam(g) + wd·θ)``:
    the decay follows the schedule factor but not the base rate; norm scales and biases get no decay) and
    :class:`distill.optim.WarmupCosine` (stepped per optimiser step, to 0 at the run's last step), built
    from ``lr``, ``weight_decay`` and ``warmup_steps``. Giving ``optimizer`` / ``lr_scheduler`` replaces
    them (a scheduler other than WarmupCosine then steps per ``lr_scheduler_interval``, per epoch by default).

    **Reporting.** The paper reports the student at the end of the schedule; ``report_end_of_schedule``
    makes :func:`distill.run.finish_fit` test the weights the fit ended with (before it loads the
    best-validation checkpoint) and add them to ``results.json`` as ``end_of_schedule`` (``epoch``,
    ``global_step``, ``val_acc``, ``test_acc``, ``test``; logged as ``end_of_schedule/test/...``). The
    top-level ``best_val_acc``, ``test_acc`` and ``test``, and ``model.safetensors``, stay those of the
    best-validation checkpoint.

    **Teachers.** ``teacher`` may be a list of files (with ``teacher_model`` one name or a list):
    their logits are averaged. They share ``teacher_image_size``. Validation metrics (agreement, KL)
    show the teacher the evaluation images resized to ``teacher_image_size``.

    Args:
        teaching: fixed, independent, consistent or function_matching.
        temperature: τ (official configs: 1 for ImageNet; 1–10 on the small data sets).
        teacher_image_size: the teacher's input side; null = the student's (``image_size``). Training
            images smaller than it (data ``train_image_size``, else ``image_size``) get a ``UserWarning``
            at setup: the teacher's crops are then upsampled.
        crop_scale: area range of the inception crop, fraction of the image.
        crop_ratio: aspect-ratio range of the inception crop.
        flip: random horizontal flips (off for digits).
        mixup_alpha: α of the mixup Beta distribution (function_matching only).
        fixed_view: teacher view cached by the fixed teacher: central_crop, resize or inception_ensemble.
        fixed_crops: number of inception crops averaged by ``inception_ensemble`` (paper: 1,000).
        teacher_cache: a file for the fixed teacher's outputs; a stale one is an error, never
            overwritten. null = ``<teacher_cache_dir>/<dataset>-train-<key>.safetensors``.
        teacher_cache_dir: folder of automatic caches; null = ``<trainer.default_root_dir>/teacher_cache``.
        lr: Adam's base learning rate.
        weight_decay: big_vision's ``wd`` (decay per step at schedule factor 1, not multiplied by lr).
        warmup_steps: linear warm-up optimiser steps (official: 5,000 ImageNet, 1,500 small data sets).
        grad_clip_norm: global gradient-norm clip; 0 disables.
        log_images: log what teacher and student saw in the first training batch to TensorBoard.
        **kwargs: ``student``, ``teacher`` (one file or a list: an ensemble), optimiser and schedule: see
            :class:`~distill.methods.TeacherStudentModule` and :class:`~distill.methods.DistillModule`.
    """

    report_end_of_schedule = True  # Beyer et al. report the end of the schedule (see Reporting)
    augments_on_device = True  # the inception crops and mixup, the same for teacher and student

    def __init__(
        self,
        *,
        teaching: str = "function_matching",
        temperature: float = 1.0,
        teacher_image_size: int | None = None,
        crop_scale: tuple[float, float] = augment.INCEPTION_SCALE,
        crop_ratio: tuple[float, float] = augment.INCEPTION_RATIO,
        flip: bool = True,
        mixup_alpha: float = 1.0,
        fixed_view: str = "central_crop",
        fixed_crops: int = 1000,
        teacher_cache: str | None = None,
        teacher_cache_dir: str | None = None,
        lr: float = 0.003,
        weight_decay: float = 1e-4,
        warmup_steps: int = 1500,
        grad_clip_norm: float = 1.0,
        log_images: bool = True,
        **kwargs: Any,
    ) -> None:
        _validate(teaching, temperature, teacher_image_size, crop_scale, crop_ratio, mixup_alpha, fixed_view,
                  fixed_crops, teacher_cache, lr, weight_decay, warmup_steps, grad_clip_norm)
        super().__init__(**kwargs)
        self.teaching = teaching
        self.cached_logits: Tensor | None = None  # the fixed teacher's outputs, per training index
        self.cache_path: Path | None = None
        self._images_logged = False

    def teacher_logits(self, images: Tensor) -> Tensor:
        """The (ensemble-averaged) teacher logits, the images resized to ``teacher_image_size`` first."""
        size = self.hparams.teacher_image_size
        if size and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > size)
        return super().teacher_logits(images)

    # ----------------------------------------------------------------------------------- views
    @property
    def crop_size(self) -> int | None:
        return self.hparams.image_size

    def make_views(self, images: Tensor, generator: torch.Generator) -> Views:
        """The student's and the teacher's inputs for one batch of un-augmented images, per ``teaching``."""
        hp = self.hparams
        batch, _, height, width = images.shape
        size = self.crop_size or height
        teacher_size = hp.teacher_image_size or size

        def crops() -> tuple[Tensor, Tensor | None]:
            boxes = augment.sample_inception_boxes(batch, height, width, generator, hp.crop_scale, hp.crop_ratio)
            return boxes, augment.sample_flips(batch, generator) if hp.flip else None

        boxes, flips = crops()
        # function matching mixes the crops; crop_resize does that while it cuts them
        a = augment.sample_mixup(generator, hp.mixup_alpha) if self.teaching == "function_matching" else None
        student = augment.crop_resize(images, boxes, size, flips, mix=a)
        if self.teaching == "fixed":
            return Views(student, None, None)
        if self.teaching == "independent":
            boxes, flips = crops()
            return Views(student, augment.crop_resize(images, boxes, teacher_size, flips), None)
        teacher = student if teacher_size == size else augment.crop_resize(images, boxes, teacher_size, flips, mix=a)
        return Views(student, teacher, a)

    def batch_generator(self, batch_idx: int) -> torch.Generator:
        rank = self.trainer.global_rank if attached_trainer(self) is not None else 0
        return augment.batch_generator(torch.initial_seed(), self.current_epoch, batch_idx, rank)

    # ----------------------------------------------------------------------------------- training
    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        views = self.make_views(batch.images, self.batch_generator(batch.batch_idx))
        if self.teaching == "fixed":
            if self.cached_logits is None:
                raise RuntimeError("fixed teaching needs the teacher cache, built in on_fit_start")
            teacher = self.cached_logits[batch.indices.to(self.cached_logits.device)]
        else:
            teacher = self.teacher_logits(views.teacher)
        logits = self.student(views.student)
        if self.hparams.log_images and not self._images_logged:
            self._log_views(views)
        return logits, {"loss": kd_loss(logits, teacher, self.hparams.temperature)}

    def _log_views(self, views: Views) -> None:
        self._images_logged = True
        if attached_trainer(self) is None or self.global_rank != 0:
            return
        experiment = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if experiment is None:
            return
        from torchvision.utils import make_grid

        def grid(images: Tensor) -> Tensor:
            images = images[:16].detach().float().cpu()
            if images.shape[-1] != views.student.shape[-1]:
                images = F.interpolate(images, size=views.student.shape[-2:], mode="bilinear", align_corners=False)
            return make_grid(images, nrow=8, normalize=True, scale_each=True)

        experiment.add_image("inputs/student", grid(views.student), self.global_step)
        if views.teacher is not None:
            experiment.add_image("inputs/teacher", grid(views.teacher), self.global_step)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self._warn_if_teacher_crops_upsampled()

    def _warn_if_teacher_crops_upsampled(self) -> None:
        """One ``UserWarning`` per fit when the teacher's crops are cut from training images smaller than
        ``teacher_image_size``: a choice one may make (a pretrained teacher on upsampled images), not an error."""
        size = self.hparams.teacher_image_size
        data = getattr(self.trainer, "datamodule", None)
        if not size or not isinstance(data, DistillDataModule) or self.trainer.global_rank != 0:
            return
        if self.teaching == "fixed" and self.hparams.fixed_view == "central_crop":
            return  # the evaluation view at image_size, whatever train_image_size is: nothing to set
        source = data.train_image_size or data.image_size
        if source < size:
            given = (f"data.train_image_size={data.train_image_size}" if data.train_image_size
                     else f"data.train_image_size unset, so data.image_size={data.image_size}")
            warnings.warn(f"PatientConsistentKD: the teacher's {size}-px crops (teacher_image_size) will be upsampled "
                          f"from {source}-px training images ({given}); to cut them from images at least as large "
                          f"as the teacher's input, as the paper does, set data.train_image_size >= {size}.",
                          UserWarning, stacklevel=2)

    def check_training_data(self, augment: str, device_resident: bool = False) -> None:
        # a second augmentation in the loaders would crop the crops: fail before training starts
        if self.augments_on_device and augment != "none":
            raise ConfigError(f"PatientConsistentKD crops, flips and mixes on the device; the data module's augment "
                              f"is {augment!r}: set data.augment to none (and train_image_size for large images).")

    # ----------------------------------------------------------------------------------- fixed teacher
    def on_fit_start(self) -> None:
        self._images_logged = False
        # fits without a DistillDataModule (benchmarks on in-memory batches) supply cached_logits themselves
        if self.teaching == "fixed" and (self.cached_logits is None or getattr(self.trainer, "datamodule", None)):
            logits, status = self.load_teacher_cache()
            self.cached_logits = logits.to(self.device)
            if self.trainer.is_global_zero:
                print(f"PatientConsistentKD: teacher cache {self.cache_path} {status} ({len(logits)} images)")

    def load_teacher_cache(self) -> tuple[Tensor, str]:
        """Loads the fixed teacher's outputs for every training image, computing them if needed."""
        hp = self.hparams
        view = {"view": hp.fixed_view, "teacher_size": hp.teacher_image_size or self.trainer.datamodule.image_size,
                **({"crops": hp.fixed_crops, "scale": list(hp.crop_scale), "ratio": list(hp.crop_ratio)}
                   if hp.fixed_view == "inception_ensemble" else {})}
        logits, status, self.cache_path = teacher_cache.load_for_training_split(
            self, view, self._fixed_teacher_outputs, loader_view="eval" if hp.fixed_view == "central_crop" else "train",
            path=hp.teacher_cache, cache_dir=hp.teacher_cache_dir)
        return logits, status

    def _fixed_teacher_outputs(self, images: Tensor) -> Tensor:
        hp = self.hparams
        size = hp.teacher_image_size or self.crop_size or images.shape[-1]
        if hp.fixed_view != "inception_ensemble":  # central_crop: the eval view; resize: the whole image
            return self.teacher_logits(augment.crop_resize(images, augment.central_boxes(len(images), *images.shape[-2:]), size))
        batch, _, height, width = images.shape
        total = torch.zeros(batch, self.hparams.num_classes, device=images.device)
        for crop in range(hp.fixed_crops):  # the same crops for every run with this seed, cache key included
            generator = augment.batch_generator(0, crop)
            boxes = augment.sample_inception_boxes(batch, height, width, generator, hp.crop_scale, hp.crop_ratio)
            flips = augment.sample_flips(batch, generator) if hp.flip else None
            total += self.teacher_logits(augment.crop_resize(images, boxes, size, flips)).float()
        return total / hp.fixed_crops

    # ----------------------------------------------------------------------------------- optimisation
    def default_optimizer(self, params: list[nn.Parameter], **options: Any) -> torch.optim.Optimizer:
        return DecoupledAdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, **options)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> WarmupCosine:
        return WarmupCosine(optimizer, self.hparams.warmup_steps)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if gradient_clip_val is None and self.hparams.grad_clip_norm:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.grad_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)


def _validate(teaching: str, temperature: float, teacher_image_size: int | None, crop_scale: Any, crop_ratio: Any,
              mixup_alpha: float, fixed_view: str, fixed_crops: int, cache: str | None, lr: float,
              weight_decay: float, warmup_steps: int, grad_clip_norm: float) -> None:
    if teaching not in TEACHINGS:
        raise ConfigError(f"teaching={teaching!r} is not one of {', '.join(TEACHINGS)}.")
    if fixed_view not in FIXED_VIEWS:
        raise ConfigError(f"fixed_view={fixed_view!r} is not one of {', '.join(FIXED_VIEWS)}.")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}; the paper sweeps 1, 2, 5, 10.")
    if teacher_image_size is not None and teacher_image_size < 1:
        raise ConfigError(f"teacher_image_size={teacher_image_size} must be a positive size, or null.")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ConfigError(f"crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1.")
    if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise ConfigError(f"crop_ratio={list(crop_ratio)} must be [low, high] with 0 < low <= high.")
    if not mixup_alpha > 0:
        raise ConfigError(f"mixup_alpha={mixup_alpha} must be > 0 (1 is the official Beta(1, 1)).")
    if fixed_crops < 1:
        raise ConfigError(f"fixed_crops={fixed_crops} must be at least 1.")
    if cache is not None and teaching != "fixed":
        raise ConfigError(f"teacher_cache is only used by teaching: fixed (teaching is {teaching!r}); remove it.")
    if not lr > 0 or weight_decay < 0 or warmup_steps < 0 or grad_clip_norm < 0:
        raise ConfigError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0 and grad_clip_norm >= 0; got lr={lr}, "
                          f"weight_decay={weight_decay}, warmup_steps={warmup_steps}, grad_clip_norm={grad_clip_norm}.")


__all__ = ["PatientConsistentKD", "Views", "TEACHINGS"]
