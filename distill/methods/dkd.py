"""DKD: Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".

Official code: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` and ``configs/cifar100/dkd/*.yaml``.
This file is also the worked example of adding a method: one file (its loss, as a pure function, and its
LightningModule), one line in :data:`distill.methods.METHODS`, one config, and its tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import ConfigError
from distill.methods.base import TrainingBatch
from distill.methods.teacher_student import TeacherStudentModule


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)``, each ``τ²·KL`` summed over its classes and averaged over the batch (paper Eqs. 5–7).

    TCKD compares the binary distributions ``b = [p_target, 1 − p_target]`` of teacher and student at
    temperature τ; NCKD compares the distributions among the non-target classes alone, ``p̂_i = p_i / (1 −
    p_target)``, i.e. a softmax over the non-target logits. Float32 whatever the input precision.
    """
    target = F.one_hot(labels, student_logits.shape[-1]).bool()
    s, t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    log_p_s, log_p_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)

    def binary(log_p: Tensor) -> Tensor:  # log [p_target, 1 − p_target], computed stably from logits
        log_target = log_p.masked_fill(~target, float("-inf")).logsumexp(dim=-1)
        log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(dim=-1)
        return torch.stack([log_target, log_rest], dim=-1)

    tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="batchmean", log_target=True)
    # the target class leaves the softmax: a logit of -inf, which KL skips (0·log 0 = 0) for both networks
    log_q_s = F.log_softmax(s.masked_fill(target, float("-inf")), dim=-1)
    log_q_t = F.log_softmax(t.masked_fill(target, float("-inf")), dim=-1)
    nckd_terms = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0.0)
    nckd = nckd_terms.sum(dim=-1).mean()
    return tckd * temperature**2, nckd * temperature**2


class DKD(TeacherStudentModule):
    """Decoupled KD: ``L = w_ce·CE(y, z_s) + min(e/W, 1)·(α·TCKD + β·NCKD)``, batch mean.

    Hinton's ``KL(p_t^τ ‖ p_s^τ)`` equals ``TCKD + (1 − p_t,target)·NCKD`` (paper Eq. 7): the teacher's
    confidence on the target class suppresses the non-target term. DKD weighs the two terms
    independently; both are multiplied by τ² as in the official code. The KD part is warmed up linearly
    over the first ``warmup_epochs`` epochs: mdistiller multiplies it by ``min(epoch / warmup, 1)`` with
    epochs counted from 1, so epoch ``e`` here (from 0) gets ``min((e + 1) / W, 1)``.

    Defaults are the official CIFAR-100 settings (``configs/cifar100/dkd/res32x4_res8x4.yaml``: CE weight 1,
    α = 1, β = 8, τ = 4, warm-up 20 epochs; on ImageNet the official configs use β = 0.5, τ = 1).

    Args:
        alpha: weight of TCKD (target-class KD).
        beta: weight of NCKD (non-target-class KD); the paper finds it should grow with the teacher's
            confidence: 8 for CIFAR-100 pairs, 0.5 on ImageNet.
        temperature: τ > 0.
        ce_weight: weight of the cross-entropy on the hard labels.
        warmup_epochs: epochs over which the KD part's weight rises linearly to 1 (0: no warm-up).
        **kwargs: ``student``, ``teacher``, optimiser and schedule: see
            :class:`~distill.methods.TeacherStudentModule` and :class:`~distill.methods.DistillModule`.
    """

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup_epochs: int = 20, **kwargs: Any) -> None:
        if not temperature > 0 or min(alpha, beta, ce_weight) < 0 or warmup_epochs < 0:
            raise ConfigError(f"DKD needs temperature > 0 and alpha, beta, ce_weight, warmup_epochs >= 0; got "
                              f"temperature={temperature}, alpha={alpha}, beta={beta}, ce_weight={ce_weight}, "
                              f"warmup_epochs={warmup_epochs}.")
        super().__init__(**kwargs)

    def kd_weight(self) -> float:
        """The warm-up factor of the KD part in the current epoch."""
        warmup = self.hparams.warmup_epochs
        return min((self.current_epoch + 1) / warmup, 1.0) if warmup else 1.0

    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        logits = self.student(batch.images)
        tckd, nckd = dkd_parts(logits, self.teacher_logits(batch.images), batch.labels, hp.temperature)
        loss_ce = F.cross_entropy(logits.float(), batch.labels)
        loss_kd = self.kd_weight() * (hp.alpha * tckd + hp.beta * nckd)
        return logits, {"loss_ce": loss_ce, "loss_tckd": tckd, "loss_nckd": nckd, "loss_kd": loss_kd,
                        "loss": hp.ce_weight * loss_ce + loss_kd}


__all__ = ["DKD", "dkd_parts"]
