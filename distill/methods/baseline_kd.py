"""BaselineKD: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import Any

from torch import Tensor

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
        self.attach_teacher(teacher, teacher_model, teacher_kwargs, teacher_pretrained)

    def training_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        losses = hinton_kd_objective(
            logits, self.teacher_logits(images), labels,
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
