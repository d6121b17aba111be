"""BaselineKD: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distill import teacher_cache
from distill.errors import ConfigError
from distill.losses import hinton_kd_objective
from distill.methods.base import DistillModule, OptimizerFactory, SchedulerFactory, check_label_smoothing


class BaselineKD(DistillModule):
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
        teacher: path of the teacher (a ``.ckpt`` from any method here, a ``.safetensors`` file, or a
            state_dict ``.pt``/``.pth``). Loaded with ``weights_only=True``.
        teacher_model: zoo name of the teacher's architecture; needed for plain state_dicts and for
            ``teacher_pretrained`` (e.g. ``tv.resnet50``), read from the file otherwise.
        teacher_kwargs: constructor arguments of ``teacher_model``.
        teacher_pretrained: with no ``teacher`` file, use torchvision/timm pretrained weights.
        temperature: τ > 0 (default 4, RepDistiller's CIFAR-100 setting; Hinton used up to 20).
        alpha: weight of the soft term in [0, 1] (default 0.9, RepDistiller); α=0 is plain CE.
        label_smoothing: ε of label smoothing on the hard term.
        cache_teacher_outputs: compute the teacher's logits for every training image once, before the
            first epoch, store them on disk (:mod:`distill.teacher_cache`, keyed by teacher weights,
            data split and view) and look them up by sample index instead of running the teacher in
            each training step, so KD costs what training the student alone costs. Exact only when
            the teacher's input never changes between epochs, so it needs ``data.augment: none`` (the
            TAKD official recipe; Hinton's MNIST students); validation still runs the teacher (for the
            agreement metrics). Our addition, not in the paper.
        teacher_cache: pin the cache file (built there if missing; a cache of another teacher or data
            is an error, never overwritten); null = ``<teacher_cache_dir>/<dataset>-train-<key>.safetensors``.
        teacher_cache_dir: folder of automatic caches; null = ``<trainer.default_root_dir>/teacher_cache``.
    """

    def __init__(
        self,
        student: str,
        teacher: str | None = None,
        teacher_model: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_pretrained: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.9,
        label_smoothing: float = 0.0,
        cache_teacher_outputs: bool = False,
        teacher_cache: str | None = None,
        teacher_cache_dir: str | None = None,
        student_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        lr_scheduler_interval: str = "epoch",
    ) -> None:
        validate_kd_hparams(temperature, alpha)
        check_label_smoothing(label_smoothing)
        super().__init__(student, student_kwargs, num_classes, in_channels, image_size,
                         optimizer, lr_scheduler, lr_scheduler_interval)
        if (teacher_cache or teacher_cache_dir) and not cache_teacher_outputs:
            raise ConfigError("teacher_cache / teacher_cache_dir are only used with cache_teacher_outputs: true; "
                              "set it, or remove them.")
        self.attach_teacher(teacher, teacher_model, teacher_kwargs, teacher_pretrained)
        #: The teacher's logits per training-set index; when set, training steps look them up instead
        #: of running the teacher (filled in on_fit_start with ``cache_teacher_outputs``).
        self.cached_logits: Tensor | None = None

    def check_training_data(self, augment: str) -> None:
        if self.hparams.cache_teacher_outputs and augment != "none":
            raise ConfigError(
                f"cache_teacher_outputs stores one teacher output per training image, but data.augment is "
                f"{augment!r}, so the teacher's input changes every epoch; set data.augment: none, or "
                "cache_teacher_outputs: false."
            )

    def on_fit_start(self) -> None:
        if not self.hparams.cache_teacher_outputs:
            return
        logits, status, path = teacher_cache.load_for_training_split(
            self, {"view": "training split as loaded (augment none)"}, self.teacher_logits, loader_view="train",
            path=self.hparams.teacher_cache, cache_dir=self.hparams.teacher_cache_dir)
        self.cached_logits = logits.to(self.device)
        if self.trainer.is_global_zero:
            print(f"BaselineKD: teacher cache {path} {status} ({len(logits)} images)")

    def training_teacher_logits(self, images: Tensor) -> Tensor:
        """The teacher's logits for this training batch: looked up in the cache when there is one."""
        if self.cached_logits is None:
            return self.teacher_logits(images)
        return self.cached_logits[self.batch_indices.to(self.cached_logits.device)]

    def training_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        losses = hinton_kd_objective(
            logits, self.training_teacher_logits(images), labels,
            temperature=self.hparams.temperature, alpha=self.hparams.alpha,
            label_smoothing=self.hparams.label_smoothing,
        )
        return logits, losses


def validate_kd_hparams(temperature: float, alpha: float) -> None:
    """One-line errors for the values every soft-target method shares."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}; the paper's values are 1–20.")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha (weight of the KD term) must be in [0, 1], got {alpha}.")
