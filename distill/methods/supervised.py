"""Training from labels alone: teachers, and the from-scratch baselines that KD is compared with."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from distill.losses import check_label_smoothing
from distill.methods.base import DistillModule, TrainingBatch


class Supervised(DistillModule):
    """Cross-entropy training of ``student`` on the hard labels, with optional label smoothing.

    Used to train teachers and the "student from scratch" row of every KD table. Its checkpoints and
    its exported ``model.safetensors`` work as the ``teacher`` of every other method.

    Args:
        label_smoothing: ε of label smoothing (Szegedy et al. 2016); 0 disables it.
        **kwargs: ``student``, optimiser and schedule: see :class:`DistillModule`.
    """

    def __init__(self, *, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        check_label_smoothing(label_smoothing)
        super().__init__(**kwargs)

    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(batch.images)
        loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.hparams.label_smoothing)
        return logits, {"loss_ce": loss, "loss": loss}


__all__ = ["Supervised"]
