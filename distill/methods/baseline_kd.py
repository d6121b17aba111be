"""BaselineKD: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distill.errors import ConfigError
from distill.losses import check_label_smoothing, hinton_kd_objective, validate_kd_hparams
from distill.methods import training_cache
from distill.methods.base import TrainingBatch
from distill.methods.teacher_student import TeacherStudentModule


class BaselineKD(training_cache.CachesTeacherOutputs, TeacherStudentModule):
    """Soft-target distillation: ``L = (1−α)·CE(y, z_s) + α·τ²·KL(p_t^τ ‖ p_s^τ)``, batch mean.

    The hard-label term uses the student's logits at τ=1; the soft term is multiplied by τ² so its
    gradients keep their size as τ grows (paper §2). The teacher is frozen and in eval mode.

    **α convention.** Here α is the weight of the *soft* (KD) term, as in Hinton's paper ("a
    considerably lower weight on the hard term") and RepDistiller. Mapping other codebases:

    * RepDistiller / mdistiller: ``-r`` (CE weight) ``= 1−α``, ``-a`` (KD weight) ``= α``; their
      CIFAR-100 recipe ``-r 0.1 -a 0.9 --kd_T 4`` is ``alpha: 0.9, temperature: 4`` (our defaults).
    * torchdistill's ``KDLoss``: its ``alpha`` weights the *hard* (CE) term and its ``beta``
      (default ``1 − alpha``) the soft term ``τ²·KL`` (``batchmean``). Ours ``α`` = their ``beta``;
      set their ``alpha = 1 − α``.
    * TAKD official code: ``(1−λ)·CE + λ·τ²·nn.KLDivLoss()(…)``; ``nn.KLDivLoss()`` defaults to
      ``reduction="mean"``, which divides the batch-summed KL by B·C instead of B, so their soft term
      is ours divided by the number of classes C. Their loss equals ``s·[(1−α)·CE + α·τ²·KL]`` with
      ``α = λ / (λ + C·(1−λ))`` and ``s = 1 − λ + λ/C`` (a learning-rate factor): use that α.

    Args:
        temperature: τ > 0 (default 4, RepDistiller's CIFAR-100 setting; Hinton used up to 20).
        alpha: weight of the soft term in [0, 1] (default 0.9, RepDistiller); α=0 is plain CE.
        label_smoothing: ε of label smoothing on the hard term.
        cache_teacher_outputs: compute the teacher's logits for every training image once, before the
            first epoch, store them on disk (:mod:`distill.teacher_cache`, keyed by teacher weights,
            data split, view and precision) and look them up instead of running the teacher in each training
            step, so KD costs what training the student alone costs. With ``data.augment: none`` (the TAKD
            official recipe; Hinton's MNIST students) one output per image. With ``data.device_resident: true``
            and ``augment: cifar`` or ``jitter``, whose views of an image are finite (``cifar`` at 32 px: 9 × 9
            crop offsets × 2 flips = 162), the output of **every view** of every image (``[images, views ×
            classes]``, fp32: 324 MB for CIFAR-10's 50,000 images, 3.2 GB for CIFAR-100), looked up by ``(index,
            view)``: exactly the targets the online teacher gives, at 162 teacher passes over the data once
            instead of one per epoch, and shared by every run with the same teacher and data. The outputs are
            computed under the run's precision (its autocast), as in the step. Validation still runs the
            teacher (for the agreement metrics). Our addition, not in the paper (no peer caches augmented views).
        teacher_cache: pin the cache file (built there if missing; a cache of another teacher or data
            is an error, never overwritten); null = ``<teacher_cache_dir>/<dataset>-train-<key>.safetensors``.
        teacher_cache_dir: folder of automatic caches; null = ``<trainer.default_root_dir>/teacher_cache``.
        **kwargs: ``student``, ``teacher`` (one file or an ensemble: :class:`TeacherStudentModule`), optimiser
            and schedule (:class:`DistillModule`).
    """

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        label_smoothing: float = 0.0,
        cache_teacher_outputs: bool = False,
        teacher_cache: str | None = None,
        teacher_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        validate_kd_hparams(temperature, alpha)
        check_label_smoothing(label_smoothing)
        if (teacher_cache or teacher_cache_dir) and not cache_teacher_outputs:
            raise ConfigError("teacher_cache / teacher_cache_dir are only used with cache_teacher_outputs: true; "
                              "set it, or remove them.")
        super().__init__(**kwargs)
        #: The teacher's logits per training-set index; when set, training steps look them up instead
        #: of running the teacher (filled in on_fit_start with ``cache_teacher_outputs``).
        self.cached_logits: Tensor | None = None

    def on_fit_start(self) -> None:
        if self.hparams.cache_teacher_outputs:
            self.cached_logits = training_cache.load_training_outputs(
                self, "BaselineKD", path=self.hparams.teacher_cache, cache_dir=self.hparams.teacher_cache_dir)

    def training_teacher_logits(self, batch: TrainingBatch) -> Tensor:
        """The teacher's logits for this training batch: looked up in the cache when there is one (by index,
        and by view when the loader augments)."""
        if self.cached_logits is None:
            return self.teacher_logits(batch.images)
        return training_cache.look_up(self.cached_logits, batch)

    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(batch.images)
        losses = hinton_kd_objective(logits, self.training_teacher_logits(batch), batch.labels,
                                     temperature=self.hparams.temperature, alpha=self.hparams.alpha,
                                     label_smoothing=self.hparams.label_smoothing)
        return logits, losses


__all__ = ["BaselineKD"]
