"""DKD (Zhao et al. 2022): the loss by parts against an independent float64 computation from probabilities,
the paper's decomposition of KD, the warm-up, the frozen teacher, and the config through the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, fake_datamodule, tiny_trainer, write_teacher
from distill.errors import ConfigError
from distill.methods import DKD, METHODS
from distill.methods.dkd import dkd_parts


def reference_parts(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, tau: float) -> tuple[float, float]:
    """TCKD and NCKD written out from the paper's definitions, one sample at a time, in float64."""
    tckd = nckd = 0.0
    for s, t, y in zip(z_s.double(), z_t.double(), labels.tolist()):
        p_s, p_t = torch.softmax(s / tau, dim=0), torch.softmax(t / tau, dim=0)
        b_s, b_t = torch.stack([p_s[y], 1 - p_s[y]]), torch.stack([p_t[y], 1 - p_t[y]])
        tckd += float((b_t * (b_t / b_s).log()).sum())
        others = [i for i in range(len(s)) if i != y]
        q_s, q_t = p_s[others] / (1 - p_s[y]), p_t[others] / (1 - p_t[y])
        nckd += float((q_t * (q_t / q_s).log()).sum())
    n = len(labels)
    return tau**2 * tckd / n, tau**2 * nckd / n


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_parts_match_the_papers_definitions(tau):
    generator = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(6, 10, generator=generator) * 3, torch.randn(6, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (6,), generator=generator)
    tckd, nckd = dkd_parts(z_s, z_t, labels, tau)
    expected = reference_parts(z_s, z_t, labels, tau)
    assert (tckd.item(), nckd.item()) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    """Paper Eq. 7, per sample: KL(p_t ‖ p_s) = TCKD + (1 − p_t,target)·NCKD."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        z_s, z_t = torch.randn(1, 7, generator=generator) * 2, torch.randn(1, 7, generator=generator) * 2
        label = torch.randint(0, 7, (1,), generator=generator)
        tckd, nckd = dkd_parts(z_s, z_t, label, 1.0)
        kl = F.kl_div(F.log_softmax(z_s, -1), F.log_softmax(z_t, -1), reduction="batchmean", log_target=True)
        p_target = torch.softmax(z_t, -1)[0, label].item()
        assert kl.item() == pytest.approx(tckd.item() + (1 - p_target) * nckd.item(), rel=1e-5)


def test_gradients_are_finite_and_reach_the_student_only():
    z_s = torch.randn(4, 5, requires_grad=True)
    z_t = torch.randn(4, 5, requires_grad=True)
    tckd, nckd = dkd_parts(z_s, z_t, torch.tensor([0, 1, 2, 3]), 4.0)
    (tckd + 8 * nckd).backward()
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0
    assert z_t.grad is None  # the teacher's logits are constants


def test_training_steps_compute_the_weighted_loss_with_warmup_from_the_frozen_teacher(tmp_path):
    torch.manual_seed(0)
    model = DKD(student="resnet8", teacher=str(write_teacher(tmp_path / "t.safetensors")), image_size=16,
                alpha=0.7, beta=3.0, temperature=2.0, ce_weight=0.5, warmup_epochs=2)
    teacher_before = copy.deepcopy(model.teacher.state_dict())  # BatchNorm buffers included
    teacher64 = copy.deepcopy(model.teacher).double().eval()
    records = []
    original = model.training_losses

    def spy(batch):
        assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
        student64 = copy.deepcopy(model.student).double().train()
        z_s, z_t = student64(batch.images.double()), teacher64(batch.images.double())
        tckd, nckd = reference_parts(z_s, z_t, batch.labels, 2.0)
        warm = min((model.current_epoch + 1) / 2, 1.0)
        ce = F.cross_entropy(z_s, batch.labels).item()
        logits, losses = original(batch)
        records.append((model.current_epoch, warm, {"loss_tckd": tckd, "loss_nckd": nckd, "loss_ce": ce,
                                                    "loss": 0.5 * ce + warm * (0.7 * tckd + 3.0 * nckd)}, losses))
        return logits, losses

    model.training_losses = spy
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=1).fit(model, datamodule=fake_datamodule())
    assert {epoch for epoch, *_ in records} == {0, 1} and {warm for _, warm, *_ in records} == {0.5, 1.0}
    for _, _, expected, got in records:
        for name, value in expected.items():
            assert got[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_one_line_errors_and_the_registry():
    with pytest.raises(ConfigError, match="temperature > 0"):
        DKD(student="resnet8", temperature=0)
    with pytest.raises(ConfigError, match="beta=-1"):
        DKD(student="resnet8", beta=-1)
    assert METHODS["DKD"] is DKD


def test_the_config_resolves_to_mdistillers_settings_on_the_cifar100_recipe():
    import contextlib
    import io

    import yaml

    from distill.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/cifar100/dkd_resnet32x4_resnet8x4.yaml"), "--print_config"])
    config = yaml.safe_load(out.getvalue())
    args = config["model"]["init_args"]
    assert config["model"]["class_path"] == "distill.methods.DKD"
    assert (args["alpha"], args["beta"], args["temperature"], args["ce_weight"], args["warmup_epochs"]) == (1, 8, 4, 1, 20)
    assert args["optimizer"]["init_args"]["lr"] == 0.05 and config["trainer"]["max_epochs"] == 240
    assert args["lr_scheduler"]["init_args"]["milestones"] == [150, 180, 210]


def test_cli_fit_on_tiny_data_writes_results(tmp_path):
    from distill.cli import main
    from distill.run import load_results

    teacher = write_teacher(tmp_path / "t.safetensors")
    cli = main(["fit", "--model", "DKD", "--model.student", "resnet8", "--model.teacher", str(teacher),
                "--model.warmup_epochs", "1", "--data.dataset", "fake", "--data.image_size", "16",
                "--data.fake_sizes", "[64, 32, 32]", "--data.batch_size", "32", "--trainer.max_epochs", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    results = load_results(cli.trainer.log_dir)
    assert results["method"] == "DKD" and 0.0 <= results["test_acc"] <= 1.0
