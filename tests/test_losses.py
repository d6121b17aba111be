"""Golden values of the KD losses against independent formulas."""

import math

import numpy as np
import pytest
import torch

from distill.losses import hinton_kd_objective, kd_loss, soft_target_kl, top1_agreement


def reference_kd(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    """τ²·KL(p_t^τ‖p_s^τ) summed over classes, averaged over the batch, written out in numpy."""
    def softmax(z):
        e = np.exp((z - z.max(axis=1, keepdims=True)) / tau)
        return e / e.sum(axis=1, keepdims=True)

    p_s, p_t = softmax(student.astype(np.float64)), softmax(teacher.astype(np.float64))
    per_sample = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1)
    return tau**2 * per_sample.mean()


def test_hand_computed_value():
    # Two classes, τ=1: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    # KL = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.1308120...
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, abs=1e-7)
    # τ=2 halves the logits: p_t ∝ (√3, 1), and the result is multiplied by τ² = 4
    p_t = np.array([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    expected_t2 = 4 * float((p_t * np.log(p_t / 0.5)).sum())
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_matches_numpy_reference(tau, classes):
    gen = torch.Generator().manual_seed(classes)
    student = torch.randn(16, classes, generator=gen) * 3
    teacher = torch.randn(16, classes, generator=gen) * 3
    got = kd_loss(student, teacher, tau).item()
    assert got == pytest.approx(reference_kd(student.numpy(), teacher.numpy(), tau), rel=1e-5, abs=1e-7)


def test_batch_mean_not_class_mean():
    teacher = torch.randn(8, 10)
    student = torch.randn(8, 10)
    single = [kd_loss(student[i:i + 1], teacher[i:i + 1], 3.0) for i in range(8)]
    assert kd_loss(student, teacher, 3.0).item() == pytest.approx(torch.stack(single).mean().item(), rel=1e-6)


def test_zero_when_logits_equal_and_teacher_detached():
    z = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    assert kd_loss(z, z.detach().clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    kd_loss(z, teacher, 4.0).backward()
    assert teacher.grad is None and z.grad is not None


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_gradient_is_tau_times_probability_difference(tau):
    # d/dz_s [τ²·KL] = τ²·(p_s^τ − p_t^τ)/(τ·B): the τ² factor leaves one factor τ
    student = torch.randn(5, 6, requires_grad=True)
    teacher = torch.randn(5, 6)
    kd_loss(student, teacher, tau).backward()
    expected = tau * (torch.softmax(student.detach() / tau, 1) - torch.softmax(teacher / tau, 1)) / 5
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_high_temperature_gradient_approaches_logit_matching():
    # Hinton §2.1: for zero-mean logits and large τ the gradient of τ²·KL tends to (z_s − z_t)/(C·B),
    # independent of τ. Without the τ² factor it would shrink as 1/τ².
    classes, batch = 10, 3
    student = torch.randn(batch, classes)
    teacher = torch.randn(batch, classes)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    expected = (student - teacher) / (classes * batch)
    for tau in (100.0, 1000.0):
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, tau).backward()
        assert (z.grad - expected).abs().max() < 2e-2 * expected.abs().max()


def test_bf16_inputs_are_computed_in_float32():
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    exact = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), 20.0)
    low = kd_loss(student.bfloat16(), teacher.bfloat16(), 20.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(exact.item(), rel=1e-6)


def test_invalid_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_objective_weights_parts():
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    parts = hinton_kd_objective(student, teacher, labels, temperature=4.0, alpha=0.9)
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert parts["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["loss_kd"].item() == pytest.approx(reference_kd(student.numpy(), teacher.numpy(), 4.0), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.1 * ce.item() + 0.9 * parts["loss_kd"].item(), rel=1e-6)
    only_ce = hinton_kd_objective(student, teacher, labels, temperature=4.0, alpha=0.0)["loss"]
    assert only_ce.item() == pytest.approx(ce.item(), rel=1e-6)


def test_agreement_and_kl_helpers():
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert top1_agreement(student, teacher).tolist() == [1.0, 0.0]
    kl = soft_target_kl(student, teacher)
    assert kl.shape == (2,)
    assert kl.mean().item() == pytest.approx(reference_kd(student.numpy(), teacher.numpy(), 1.0), rel=1e-6)
