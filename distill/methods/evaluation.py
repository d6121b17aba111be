"""What validation and test measure: accuracy (top-1, top-5), cross-entropy, and, where a teacher teaches,
the student's top-1 agreement with it and ``KL(p_t ‖ p_s)``."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from distill.losses import soft_target_kl, top1_agreement

STAGES = ("val", "test")


class EvaluationMetrics(nn.Module):
    """The metrics of the validation and test loops, and the best validation accuracy so far (``best``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.top5 = num_classes > 5
        for stage in STAGES:
            metrics: dict[str, Metric] = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                                          "loss": MeanMetric(), "agreement": MeanMetric(), "kl": MeanMetric()}
            if self.top5:
                metrics["acc_top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
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
            metrics[name](*values)
            log(f"{prefix}{stage}/{name}", metrics[name], batch_size=size, prog_bar=stage == "val" and name == "acc")


__all__ = ["EvaluationMetrics", "STAGES"]
