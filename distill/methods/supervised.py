"""Training from labels alone: teachers, and the from-scratch baselines that KD is compared with."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from distill.methods.base import DistillModule, OptimizerFactory, SchedulerFactory, check_label_smoothing


class Supervised(DistillModule):
    """Cross-entropy training of ``student`` on the hard labels, with optional label smoothing.

    Used to train teachers and the "student from scratch" row of every KD table. Its checkpoints and
    its exported ``model.safetensors`` work as the ``teacher`` of every other method.

    Args:
        label_smoothing: ε of label smoothing (Szegedy et al. 2016); 0 disables it.
    """

    def __init__(
        self,
        student: str,
        student_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        lr_scheduler_interval: str = "epoch",
    ) -> None:
        check_label_smoothing(label_smoothing)
        super().__init__(student, student_kwargs, num_classes, in_channels, image_size,
                         optimizer, lr_scheduler, lr_scheduler_interval)

    def training_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        return logits, {"loss_ce": loss, "loss": loss}
