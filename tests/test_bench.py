"""The throughput harness, device-resident data, and speed options that must not change results."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distill.bench import REQUIRED_KEYS, main
from distill.data import DistillDataModule
from distill.data.resident import BatchAugment
from distill.errors import ConfigError
from distill.methods import BaselineKD
from distill.methods.base import EpochMeans
from distill.speed import SpeedOptions, apply_speed_options, networks_of
from conftest import fake_datamodule, tiny_trainer

QUICK = ["--pairs", "tiny_mlp", "--batch-size", "8", "--repeats", "2", "--steps", "2", "--warmup", "1",
         "--no-ddp", "--scaling-batch-sizes", "--fit"]


def test_harness_writes_every_method_row_with_the_required_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main([*QUICK, "--no-isolate", "--json", str(out)])
    overhead, *records = json.loads(out.read_text())
    assert overhead["kind"] == "overhead" and isinstance(overhead["overhead_ms_per_step"], float)
    from distill.bench import METHODS

    assert [r["method"] for r in records] == list(METHODS)
    assert {"BaselineKD+cache", "TeacherAssistantKD/ta1", "TeacherAssistantKD/student", "ResidualKD/student",
            "ResidualKD/assistant", "PatientConsistentKD/fixed", "PatientConsistentKD/function_matching"} <= set(METHODS)
    for record in records:
        assert set(REQUIRED_KEYS) <= set(record)
        assert record["images_per_s"] > 0 and record["bound_images_per_s"] > 0 and record["ratio"] > 0
        assert len(record["method_images_per_s_each"]) == 2
    by_method = {r["method"]: r for r in records}
    assert by_method["Supervised"]["teacher"] is None
    assert (by_method["TeacherAssistantKD/ta1"]["teacher"], by_method["TeacherAssistantKD/ta1"]["student"]) == \
        ("mlp_300_300", "mlp_30_30")  # tiny_mlp: the assistant is trained from the teacher
    assert "| step | tiny_mlp | BaselineKD | 8 |" in capsys.readouterr().out


@pytest.mark.slow  # a fresh process imports torch and lightning: 10 s of CPU, a minute on a busy machine
def test_isolated_step_row_measures_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    main([*QUICK, "--isolate", "--no-overhead", "--methods", "BaselineKD", "--json", str(out)])
    (step,) = json.loads(out.read_text())
    assert step["kind"] == "step" and step["method"] == "BaselineKD" and step["peak_memory_mb"] > 0
    assert set(REQUIRED_KEYS) <= set(step)


def test_full_loop_rows_with_and_without_device_resident_data(tmp_path):
    out = tmp_path / "bench.json"
    main([*QUICK, "mnist5k", "--pairs", "--no-overhead", "--fit-methods", "BaselineKD", "--fit-steps", "3",
          "--workers", "0", "--json", str(out)])
    fits = json.loads(out.read_text())
    assert [(r["kind"], r["method"], r["device_resident"]) for r in fits] == [
        ("fit", "BaselineKD", False), ("fit", "BaselineKD", True)]
    for record in fits:
        assert set(REQUIRED_KEYS) <= set(record) and record["images_per_s"] > 0
        assert 0 <= record["data_wait_share"] < 1


@pytest.mark.parametrize("dataset", ["mnist5k", "fake"])
def test_device_resident_batches_match_the_dataloader_path(dataset):
    torch.manual_seed(5)  # the run's seed: both paths shuffle with torch.initial_seed()
    options = dict(dataset=dataset, batch_size=48, augment="none")
    normal = DistillDataModule(**options).train_dataloader()
    resident = DistillDataModule(**options, device_resident=True).train_dataloader()
    for epoch in (0, 3):
        normal.sampler.set_epoch(epoch)
        resident.sampler.set_epoch(epoch)
        pairs = list(zip(normal, resident, strict=True))
        assert len(pairs) == len(normal)
        for (images, labels, indices), (images2, labels2, indices2) in pairs:
            assert torch.equal(images, images2) and torch.equal(labels, labels2) and torch.equal(indices, indices2)
    assert not torch.equal(next(iter(resident))[2], torch.arange(48))  # shuffled


def test_device_resident_eval_loaders_match_too():
    normal, resident = fake_datamodule(), fake_datamodule(device_resident=True)
    for a, b in zip(normal.val_dataloader(), resident.val_dataloader(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_batched_crop_and_flip_are_pad_crops_and_mirrors_of_the_originals():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    augmented = BatchAugment("cifar", 16)(images, torch.Generator().manual_seed(0))  # padding 2
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    padded = F.pad(images, (2, 2, 2, 2))
    for original, result in zip(padded, augmented):
        candidates = [crop.flip(-1) if flip else crop
                      for top in range(5) for left in range(5) for flip in (False, True)
                      for crop in [original[:, top:top + 16, left:left + 16]]]
        assert any(torch.equal(result, c) for c in candidates)
    again = BatchAugment("cifar", 16)(images, torch.Generator().manual_seed(0))
    assert torch.equal(augmented, again)  # seeded: reproducible


def test_device_resident_augmented_batches_have_the_right_shapes_and_range():
    torch.manual_seed(0)
    data = fake_datamodule(augment="cifar", device_resident=True)
    loader = data.train_dataloader()
    low, high = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5  # fake's normalisation of black and white
    seen = []
    for images, labels, indices in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
        assert low - 1e-6 <= images.min() and images.max() <= high + 1e-6
        assert labels.dtype == torch.int64 and indices.dtype == torch.int64
        seen.append(indices)
    assert sorted(torch.cat(seen).tolist()) == list(range(data.train_set_size))
    first = next(iter(loader))[0]
    assert torch.equal(first, next(iter(loader))[0])  # same epoch, same crops
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[0])


def test_device_resident_fit_runs_and_bad_settings_fail_early(tmp_path, teacher_file):
    model = BaselineKD("resnet8", teacher=str(teacher_file), image_size=16)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=fake_datamodule(augment="cifar", device_resident=True))
    assert {"train/loss_epoch", "train/acc"} <= set(trainer.logged_metrics)
    with pytest.raises(ConfigError, match="augment"):
        fake_datamodule(augment="inception", device_resident=True)
    with pytest.raises(ConfigError, match="num_workers"):
        fake_datamodule(num_workers=2, device_resident=True)


def test_epoch_means_weight_by_batch_size():
    means = EpochMeans()
    means.update({"loss": torch.tensor(1.0)}, 10)
    means.update({"loss": torch.tensor(4.0)}, 5)  # a smaller last batch
    assert means.compute()["loss"].item() == pytest.approx((10 * 1 + 5 * 4) / 15)
    assert means.compute() == {}  # reset for the next epoch


def _kd_model(teacher_file):
    torch.manual_seed(0)
    return BaselineKD("resnet8", teacher=str(teacher_file), image_size=16).train()


def test_channels_last_and_inference_mode_teacher_leave_the_loss_unchanged(teacher_file):
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    plain = _kd_model(teacher_file)
    _, reference = plain.training_losses(images, labels)
    with torch.no_grad():  # the teacher as it ran before inference_mode
        expected_teacher = plain.teacher(images)
    assert torch.equal(plain.teacher_logits(images), expected_teacher)
    fast = _kd_model(teacher_file)
    apply_speed_options(fast, channels_last=True)
    assert len(networks_of(fast)) == 2
    assert fast.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _, losses = fast.training_losses(images.to(memory_format=torch.channels_last), labels)
    for name in ("loss", "loss_ce", "loss_kd"):
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=1e-5, abs=1e-6)
    losses["loss"].backward()  # the teacher's logits may be saved for backward
    assert fast.student.conv1.weight.grad is not None
    assert all(p.grad is None for p in fast.teacher.parameters())


def test_teacher_logits_are_usable_where_autograd_saves_them(teacher_file):
    model = _kd_model(teacher_file)
    images = torch.randn(4, 3, 16, 16)
    teacher = model.teacher_logits(images)
    assert not teacher.is_inference() and not teacher.requires_grad
    (model.student(images) * teacher).sum().backward()  # mul saves the teacher's logits


def test_speed_options_callback_rejects_a_wrong_compile_mode():
    with pytest.raises(ConfigError, match="compile"):
        SpeedOptions(compile="fastest")
    assert SpeedOptions(channels_last=True, compile="default").compile == "default"


def test_speed_options_in_a_fit(tmp_path, teacher_file):
    model = BaselineKD("resnet8", teacher=str(teacher_file), image_size=16)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SpeedOptions(channels_last=True)])
    trainer.fit(model, datamodule=fake_datamodule())
    assert model.teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(trainer.logged_metrics["train/loss_epoch"])
