"""Hinton et al. (2015) §3: correcting the bias of a class the student never saw in its transfer set.

A student distilled on a transfer set without class ``c`` learns about ``c`` only from the teacher's
soft targets; its output for ``c`` is then systematically too low. The paper adds a constant to the
class-``c`` bias (+3.5 for the digit 3, "tuned on the test set"). Adding ``b`` to the bias of the
last layer is the same as adding ``b`` to logit ``c``, which is what :func:`shifted_predictions` does.
Unlike the paper we choose ``b`` on the *validation* split and report the test split once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distill.data import DistillDataModule
from distill.run import data_arguments
from distill.teachers import load_network


def shifted_predictions(logits: Tensor, class_index: int, bias: float) -> Tensor:
    """Top-1 predictions after adding ``bias`` to the logit of ``class_index``."""
    shifted = logits.clone()
    shifted[:, class_index] += bias
    return shifted.argmax(dim=1)


def choose_bias(logits: Tensor, labels: Tensor, class_index: int, grid: Sequence[float]) -> float:
    """The bias from ``grid`` with the fewest errors; ties go to the smallest ``|b|`` (least change)."""
    errors = {float(b): int((shifted_predictions(logits, class_index, b) != labels).sum()) for b in grid}
    return min(errors, key=lambda b: (errors[b], abs(b)))


@torch.no_grad()
def split_logits(network: torch.nn.Module, data: DistillDataModule, split: str) -> tuple[Tensor, Tensor]:
    network.eval()
    logits, labels = [], []
    for images, batch_labels, _ in data.eval_dataloader(split):
        logits.append(network(images).float())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def bias_correction(run: Mapping[str, Any], class_index: int, grid: Sequence[float]) -> dict[str, Any]:
    """Chooses the class bias of a finished run's exported network on validation; test errors before/after."""
    data = DistillDataModule(**data_arguments(run["config"]))
    loaded = load_network(run["model_file"], None, data.num_classes, data.in_channels, data.image_size)
    bias = choose_bias(*split_logits(loaded.network, data, "val"), class_index, grid)
    logits, labels = split_logits(loaded.network, data, "test")
    of_class = labels == class_index
    result: dict[str, Any] = {"bias": bias, "test_size": len(labels), "test_class_size": int(of_class.sum())}
    for when, b in (("before", 0.0), ("after", bias)):
        wrong = shifted_predictions(logits, class_index, b) != labels
        result[f"test_errors_{when}"] = int(wrong.sum())
        result[f"test_class_errors_{when}"] = int(wrong[of_class].sum())
    return result
