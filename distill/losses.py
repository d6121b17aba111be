"""Distillation losses that several methods share, as pure functions of tensors (no modules, no state, no
I/O): soft-target KD (:func:`kd_loss`, :func:`hinton_kd_objective`), the feature distance of ResidualKD
(:func:`feature_mse`), the teacher–student metrics, and the one-line checks of their arguments. A loss
only one method uses sits at the top of that method's file (DKD's ``dkd_parts``).

Conventions: ``z_s``/``z_t`` are student/teacher logits of shape ``[batch, classes]``, ``τ`` the
temperature and ``p^τ = softmax(z / τ)``. KL divergences are summed over classes and averaged over the
batch (PyTorch's ``reduction="batchmean"``), never averaged over classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.errors import ConfigError


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015) soft-target loss ``τ²·KL(p_t^τ ‖ p_s^τ)``, batch mean.

    The factor τ² keeps the gradient magnitude independent of τ: the gradient of
    ``KL(p_t^τ ‖ p_s^τ)`` with respect to ``z_s`` is ``(p_s^τ − p_t^τ)/τ`` per sample, so without τ²
    the soft term would fade as 1/τ² relative to a hard-label term. The teacher's logits are treated
    as constants (detached). Computed in float32 whatever the input precision, because the
    log-softmax of bf16 logits at high τ loses most of its mantissa.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(p_t ‖ p_s)`` at τ=1 per sample, shape ``[batch]``: the teacher–student divergence we log."""
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-sample 1.0 where student and teacher predict the same class, else 0.0."""
    return (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float()


def hinton_kd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The BaselineKD objective ``(1−α)·CE(y, z_s) + α·τ²·KL(p_t^τ ‖ p_s^τ)``, by parts.

    Returns ``{"loss_ce": ..., "loss_kd": ..., "loss": ...}`` where ``loss_ce``/``loss_kd`` are the
    unweighted terms (so their curves stay comparable across α) and ``loss`` the weighted sum. The
    hard-label term uses the student's logits at τ=1, as in the paper.
    """
    loss_ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    loss_kd = kd_loss(student_logits, teacher_logits, temperature)
    return {"loss_ce": loss_ce, "loss_kd": loss_kd, "loss": (1 - alpha) * loss_ce + alpha * loss_kd}


def feature_mse(feature: Tensor, target: Tensor) -> Tensor:
    """The paper's squared l2 distance ``‖feature − target‖²`` (Eqs. 3–4), per position: summed over
    channels, averaged over the spatial positions of a map and over the batch; float32 under mixed precision.

    For vector features (an MLP's last hidden layer) this is exactly the per-sample ``‖·‖²``, batch mean.
    For ``C×H×W`` maps the paper's sum over all elements is divided by ``H·W`` (our choice): the gradient
    at each position then does not grow with the map's resolution, so one learning rate serves 7×7 and
    32×32 maps alike. (A mean over all elements, as some FitNets code uses, also divides by C: on mnist5k S
    then barely learnt at the recipe's learning rate.)
    """
    squared = (feature.float() - target.float()).pow(2)
    if squared.dim() == 4:
        return squared.sum(dim=1).mean()
    return squared.flatten(1).sum(dim=1).mean()


def mean_norm(residual: Tensor) -> Tensor:
    """Mean over the batch of each sample's l2 norm (the size of a residual, for logging)."""
    return residual.detach().float().flatten(1).norm(dim=1).mean()


def validate_kd_hparams(temperature: float, alpha: float) -> None:
    """One-line errors for the values every soft-target method shares."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}; the paper's values are 1–20.")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha (weight of the KD term) must be in [0, 1], got {alpha}.")


def check_label_smoothing(label_smoothing: float) -> None:
    """One clear error for an ε of label smoothing outside [0, 1)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


__all__ = ["feature_mse", "mean_norm", "validate_kd_hparams", "check_label_smoothing", "kd_loss", "soft_target_kl", "top1_agreement", "hinton_kd_objective"]

