"""What validation and test measure: accuracy (top-1, top-5), cross-entropy, and, where a teacher teaches,
the student's top-1 agreement with it and ``KL(p_t ‖ p_s)``.

Every batch only adds to sums on the device: no update reads a value on the host, which on a GPU would wait for
all the work queued before it (torchmetrics' ``MeanMetric`` checks every value for NaN on the host and its
classification metrics validate their inputs there by default, several synchronisations per evaluation batch).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from distill.losses import soft_target_kl, top1_agreement

STAGES = ("val", "test")


class Mean(Metric):
    """The mean of all the values given to :meth:`update` (each element of a tensor counts once, times its weight),
    as torchmetrics' ``MeanMetric`` computes it, but summed on the device without reading anything on the host: a
    NaN makes the mean NaN (what the logs then show) instead of raising. (``MeanMetric(nan_strategy="disable")``
    skips the host check too, but torchmetrics 1.9 then drops the weights: the loss would be an unweighted mean of
    the batch means.)"""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float = 1.0) -> None:
        value = value.detach().float()
        self.total += value.sum() * weight
        self.weight += value.numel() * weight

    def compute(self) -> Tensor:
        return self.total / self.weight


class EvaluationMetrics(nn.Module):
    """The metrics of the validation and test loops, and the best validation accuracy so far (``best``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.top5 = num_classes > 5
        for stage in STAGES:
            # validate_args=False: the input checks read values on the host (the labels come from our DataModule)
            metrics: dict[str, Metric] = {
                "acc": MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False),
                "loss": Mean(), "agreement": Mean(), "kl": Mean()}
            if self.top5:
                metrics["acc_top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro",
                                                         validate_args=False)
            setattr(self, stage, nn.ModuleDict(metrics))
        self.best = MaxMetric()

    def accuracy(self, stage: str = "val") -> Metric:
        return getattr(self, stage)["acc"]

    def end_validation(self) -> tuple[Tensor, Tensor]:
        """The validation accuracy of the epoch that ends, and the best so far including it."""
        accuracy = self.accuracy("val").compute()
        self.best(accuracy)
        return accuracy, self.best.compute()

    def update(self, stage: str, logits: Tensor, labels: Tensor, teacher_logits: Tensor | None,
               log: Callable[..., Any], prefix: str) -> None:
        """Updates ``stage``'s metrics with one batch and logs each as ``<prefix><stage>/<name>``."""
        metrics, size = getattr(self, stage), logits.shape[0]
        updates: dict[str, tuple[Tensor, ...]] = {
            "loss": (F.cross_entropy(logits.float(), labels), size),  # weighted by batch size
            "acc": (logits, labels),
        }
        if self.top5:
            updates["acc_top5"] = (logits, labels)
        if teacher_logits is not None:
            updates["agreement"] = (top1_agreement(logits, teacher_logits),)
            updates["kl"] = (soft_target_kl(logits, teacher_logits),)
        for name, values in updates.items():
            metrics[name].update(*values)  # the epoch's value only: forward would also compute the batch's
            log(f"{prefix}{stage}/{name}", metrics[name], batch_size=size, prog_bar=stage == "val" and name == "acc")


__all__ = ["EvaluationMetrics", "Mean", "STAGES"]
