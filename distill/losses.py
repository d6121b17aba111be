"""Distillation losses as pure functions of tensors (no modules, no state, no I/O).

Conventions: ``z_s``/``z_t`` are student/teacher logits of shape ``[batch, classes]``, ``τ`` the
temperature and ``p^τ = softmax(z / τ)``. KL divergences are summed over classes and averaged over the
batch (PyTorch's ``reduction="batchmean"``), never averaged over classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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


__all__ = ["kd_loss", "soft_target_kl", "top1_agreement", "hinton_kd_objective"]

