"""The throughput harness, device-resident data, and speed options that must not change results."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distill.tools import bench
from distill.tools.bench import REQUIRED_KEYS, main
from distill.data import DistillDataModule
from distill.data.resident import BatchAugment
from distill.errors import ConfigError
from distill.methods import BaselineKD, Supervised
from distill.methods.epoch_means import EpochMeans
from distill.callbacks import SpeedOptions, apply_speed_options, networks_of
from conftest import fake_datamodule, tiny_trainer, training_batch

QUICK = ["--pairs", "tiny_mlp", "--batch-size", "8", "--repeats", "2", "--steps", "2", "--warmup", "1",
         "--no-ddp", "--scaling-batch-sizes", "--fit"]


def test_harness_writes_every_method_row_with_the_required_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main([*QUICK, "--no-isolate", "--json", str(out)])
    overhead, *records = json.loads(out.read_text())
    assert overhead["kind"] == "overhead" and isinstance(overhead["overhead_ms_per_step"], float)
    from distill.tools.bench import ROWS

    assert [r["method"] for r in records] == list(ROWS)
    assert {"BaselineKD+cache", "TeacherAssistantKD/ta1", "TeacherAssistantKD/student", "ResidualKD/student",
            "ResidualKD/assistant", "PatientConsistentKD/fixed", "PatientConsistentKD/function_matching",
            "DKD"} <= set(ROWS)
    for record in records:
        assert set(REQUIRED_KEYS) <= set(record)
        assert record["images_per_s"] > 0 and record["bound_images_per_s"] > 0 and record["ratio"] > 0
        assert len(record["method_images_per_s_each"]) == 2
        assert record["floor_ratio"] > 0 and record["floor_images_per_s"] > 0
    by_method = {r["method"]: r for r in records}
    assert by_method["Supervised"]["teacher"] is None
    assert (by_method["TeacherAssistantKD/ta1"]["teacher"], by_method["TeacherAssistantKD/ta1"]["student"]) == \
        ("mlp_300_300", "mlp_30_30")  # tiny_mlp: the assistant is trained from the teacher
    from distill.methods import METHODS
    from distill.tools.bench import SPECIAL_ROWS

    generic = {r["method"] for r in records if r["bound"] == "method step"}
    assert "DKD" in generic and generic == set(METHODS) - set(SPECIAL_ROWS)
    assert by_method["DKD"]["teacher"] == "mlp_300_300"
    out = capsys.readouterr().out
    assert "| step | tiny_mlp | BaselineKD | 8 |" in out and "| plain torch |" in out and "| method step |" in out


def test_every_registered_method_is_benchmarked_and_kill_tested(monkeypatch):
    """The benchmark and the kill test read the registry: every method of distill.methods.METHODS has a
    bench row (its special rows or a generic one) and is in the kill test's list, in the registry's
    order; a method added to the registry gets a generic row with no edit of either tool."""
    from distill.methods import METHODS, TeacherStudentModule
    from distill.tools import killtest
    from distill.tools.bench import METHOD_STEP, ROWS, SPECIAL_ROWS, method_rows

    def method_of(row: str) -> str:
        return row.split("/")[0].split("+")[0]

    assert list(dict.fromkeys(method_of(row) for row in ROWS)) == list(METHODS)
    assert set(SPECIAL_ROWS) <= set(METHODS)
    assert killtest.METHODS == tuple(METHODS)

    class NewKD(TeacherStudentModule):
        def training_losses(self, batch):
            raise NotImplementedError

    rows = method_rows({**METHODS, "NewKD": NewKD})
    assert list(rows) == [*ROWS, "NewKD"]
    assert rows["NewKD"].bound_kind == METHOD_STEP and rows["NewKD"].teacher_role == "teacher"


def test_a_failing_step_row_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    import distill.tools.bench as bench
    from distill.errors import NonFiniteLossError

    measure = bench.measure_step

    def fails_for_kd(spec):
        if spec.method == "BaselineKD":
            raise NonFiniteLossError("non-finite training loss at global step 3")
        return measure(spec)

    monkeypatch.setattr(bench, "measure_step", fails_for_kd)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as stop:
        main([*QUICK, "--no-isolate", "--no-overhead", "--no-floor", "--methods", "BaselineKD", "Supervised",
              "--json", str(out)])
    assert stop.value.code == 1
    (record,) = json.loads(out.read_text())
    assert record["method"] == "Supervised" and "floor_ratio" not in record
    err = capsys.readouterr().err
    assert "1 step row(s) failed" in err
    assert "BaselineKD on tiny_mlp, batch 8: NonFiniteLossError: non-finite training loss at global step 3" in err


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
    model = BaselineKD(student="resnet8", teacher=str(teacher_file), image_size=16)
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


def test_epoch_means_fold_in_chunks_and_count_per_sample_values(monkeypatch):
    monkeypatch.setattr(EpochMeans, "fold_every", 4)
    means = EpochMeans()
    generator = torch.Generator().manual_seed(0)
    losses, hits, sizes = [], [], [8, 8, 8, 8, 8, 8, 8, 8, 8, 3]  # 10 steps: two folds and a rest
    for size in sizes:
        losses.append(torch.rand((), generator=generator))
        hits.append(torch.rand(size, generator=generator) < 0.5)
        means.update({"loss": losses[-1], "acc": hits[-1]}, size)
    result = means.compute()
    expected = sum(value.item() * size for value, size in zip(losses, sizes)) / sum(sizes)
    assert result["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert result["acc"].item() == pytest.approx(torch.cat(hits).float().mean().item(), rel=1e-6)
    assert means.compute() == {} and means.count == 0


def test_each_rows_bound_computes_the_methods_loss(tmp_path):
    """The plain-torch bound of a row is the method's own computation: on the same batch (dropout
    off) its loss is the method's training loss; PatientConsistentKD's also draws the method's views
    and clips as its recipe does. (The optimiser is the method's own: PlainStep.setup takes it from
    the Trainer.) A generic row's "method step" bound calls the method's own training_losses: it runs
    and gives the same loss."""
    from pathlib import Path

    from distill.tools.bench import (METHOD_STEP, PLAIN_TORCH, ROWS, PAIRS, SPECIAL_ROWS, BenchContext, make_batches,
                                     patient_bound)
    from distill.methods import METHODS, PatientConsistentKD

    pair = PAIRS["tiny_mlp"]
    batches = make_batches(pair, 8, 2, torch.device("cpu"))
    context = BenchContext(pair, Path(tmp_path), batches)
    images, labels, indices = batches[1]
    kinds = {}
    for name, entry in ROWS.items():
        kinds[name] = entry.bound_kind
        module = entry.build(context).eval()
        assert isinstance(module, METHODS[name.split("/")[0].split("+")[0]]), name
        if isinstance(module, PatientConsistentKD):  # the same draws in the method's step and the bound
            module.batch_generator = lambda batch_idx: torch.Generator().manual_seed(3)
            bound = patient_bound(module, torch.Generator().manual_seed(3))
        else:
            bound = entry.bound(module)
        with torch.no_grad():
            expected = module.training_losses(training_batch(images, labels, indices))[1]["loss"]
            got = bound.loss(batches[1])
        torch.testing.assert_close(got, expected, msg=name)
        assert bound.clip_norm == (module.hparams.grad_clip_norm if isinstance(module, PatientConsistentKD) else None)
    assert {name for name, kind in kinds.items() if kind == METHOD_STEP} == set(METHODS) - set(SPECIAL_ROWS)
    assert set(kinds.values()) == {PLAIN_TORCH, METHOD_STEP}


def test_bound_steps_the_methods_own_optimiser_and_schedule(tmp_path):
    from pathlib import Path

    from distill.tools.bench import ROWS, PAIRS, BenchContext, Interleave, PlainStep, _Cycle, _quiet_trainer, make_batches

    pair, device = PAIRS["tiny_mlp"], torch.device("cpu")
    batches = make_batches(pair, 8, 2, device)
    entry = ROWS["PatientConsistentKD/consistent"]
    module = entry.build(BenchContext(pair, Path(tmp_path), batches))
    plain = PlainStep(entry.bound(module), device, "32-true")
    timer = Interleave(plain, batches, 1, 2, device)
    loader = torch.utils.data.DataLoader(_Cycle(batches, 5), batch_size=None)
    trainer = _quiet_trainer(device, "32-true", max_epochs=-1, max_steps=5, callbacks=[timer], default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert plain.optimizer is trainer.optimizers[0]
    assert plain.schedulers == [trainer.lr_scheduler_configs[0].scheduler]
    assert len(timer.method_s) == len(timer.bound_s) == 2
    # both stepped the one optimiser: 5 method steps, 1 + 2 × 2 bound steps
    assert int(next(iter(plain.optimizer.state.values()))["step"]) == 10


def test_lightning_floor_runs_the_bound_on_the_methods_networks_optimiser_and_clipping(tmp_path):
    """The floor row trains the method's own networks with the optimiser and schedule its Trainer built
    (their state continues), keeps the frozen teacher in eval mode, and clips as the recipe does."""
    from pathlib import Path

    from lightning.pytorch.callbacks import Callback

    from distill.tools.bench import ROWS, PAIRS, BenchContext, LightningFloor, _Cycle, _quiet_trainer, make_batches

    pair, device = PAIRS["tiny_mlp"], torch.device("cpu")
    batches = make_batches(pair, 8, 2, device)
    entry = ROWS["PatientConsistentKD/consistent"]
    module = entry.build(BenchContext(pair, Path(tmp_path), batches))
    trainer = _quiet_trainer(device, "32-true", max_epochs=-1, max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=_Cycle(batches, 3))
    optimizer, schedule = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler

    class Check(Callback):
        seen: list = []

        def on_before_optimizer_step(self, trainer, pl_module, opt):
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.student.parameters()]))
            self.seen.append((module.teacher.training, module.student.training, opt is optimizer, float(norm)))

    floor = LightningFloor(module, entry.bound(module), trainer)
    floor_trainer = _quiet_trainer(device, "32-true", max_epochs=-1, max_steps=4, callbacks=[Check()],
                                   default_root_dir=tmp_path)
    floor_trainer.fit(floor, train_dataloaders=_Cycle(batches, 4))
    assert floor_trainer.optimizers == [optimizer] and floor_trainer.lr_scheduler_configs[0].scheduler is schedule
    assert int(next(iter(optimizer.state.values()))["step"]) == 3 + 4 and schedule.last_epoch == 3 + 4
    assert [seen[:3] for seen in Check.seen] == [(False, True, True)] * 4
    assert all(norm <= module.hparams.grad_clip_norm + 1e-4 for *_, norm in Check.seen)


def _kd_model(teacher_file):
    torch.manual_seed(0)
    return BaselineKD(student="resnet8", teacher=str(teacher_file), image_size=16).train()


def test_channels_last_and_inference_mode_teacher_leave_the_loss_unchanged(teacher_file):
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    plain = _kd_model(teacher_file)
    _, reference = plain.training_losses(training_batch(images, labels))
    with torch.no_grad():  # the teacher as it ran before inference_mode
        expected_teacher = plain.teacher(images)
    assert torch.equal(plain.teacher_logits(images), expected_teacher)
    fast = _kd_model(teacher_file)
    apply_speed_options(fast, channels_last=True)
    assert len(networks_of(fast)) == 2
    assert fast.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _, losses = fast.training_losses(training_batch(images.to(memory_format=torch.channels_last), labels))
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
    model = BaselineKD(student="resnet8", teacher=str(teacher_file), image_size=16)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SpeedOptions(channels_last=True)])
    trainer.fit(model, datamodule=fake_datamodule())
    assert model.teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(trainer.logged_metrics["train/loss_epoch"])


@pytest.mark.parametrize("method", ["Supervised", "PatientConsistentKD"])
def test_a_fused_optimiser_trains_the_same_student(method, tmp_path, teacher_file):
    """SpeedOptions(fused_optimizer=true): the method's optimiser (its default: SGD for Supervised, DecoupledAdamW
    with its per-step decoupled decay for PatientConsistentKD) is built with its fused kernel and trains the same
    weights as the unfused one."""
    from distill.methods import PatientConsistentKD

    def fit(fused: bool):
        torch.manual_seed(0)
        if method == "Supervised":
            model = Supervised(student="resnet8", num_classes=10, in_channels=3, image_size=16)
        else:
            # a large decay, so that a fused update that lost it could not pass for rounding
            model = PatientConsistentKD(student="resnet8", teacher=str(teacher_file), image_size=16, warmup_steps=2,
                                        weight_decay=0.1)
        trainer = tiny_trainer(tmp_path / f"{method}{fused}", max_epochs=2,
                               callbacks=[SpeedOptions(fused_optimizer=fused)])
        trainer.fit(model, datamodule=fake_datamodule(augment="none"))
        groups = trainer.optimizers[0].param_groups
        assert all(bool(group["fused"]) == fused for group in groups)
        return model.student.state_dict()

    unfused, fused = fit(False), fit(True)
    # Adam divides by the root of its second moment, which magnifies the kernels' different rounding (4e-6 here)
    tolerance = dict(rtol=1e-5, atol=1e-6) if method == "Supervised" else dict(rtol=1e-3, atol=2e-5)
    for name, value in unfused.items():
        torch.testing.assert_close(fused[name], value, **tolerance, msg=name)


def test_a_fused_optimiser_the_optimiser_lacks_is_a_config_error(tmp_path):
    model = Supervised(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16,
                       optimizer=lambda params: torch.optim.RMSprop(params, lr=0.01))
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SpeedOptions(fused_optimizer=True)])
    with pytest.raises(ConfigError, match="fused_optimizer"):
        trainer.fit(model, datamodule=fake_datamodule())


def test_a_compiled_fit_trains_the_same_student_as_an_eager_one(tmp_path, monkeypatch):
    """SpeedOptions(compile="reduce-overhead"): static-shape graphs for the 32-image batches, the last 16-image batch
    and the evaluation batches; the same weights as the eager fit, and every training and validation step marked as
    a new CUDA-graph step (a no-op on a CPU)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def fit(compile):
        torch.manual_seed(0)
        model = Supervised(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16)
        trainer = tiny_trainer(tmp_path / str(compile), max_epochs=2, callbacks=[SpeedOptions(compile=compile)])
        trainer.fit(model, datamodule=fake_datamodule(fake_sizes=[80, 40, 40]))  # batches of 32, 32 and 16
        assert (getattr(model.student, "_compiled_call_impl", None) is not None) == bool(compile)
        return model.student.state_dict()

    eager, compiled = fit(False), fit("reduce-overhead")
    assert len(marks) == 2 * (3 + 2)  # 3 training and 2 validation batches an epoch
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_gpu_suite_runs_its_rows_on_a_cpu_and_writes_json_and_markdown(tmp_path):
    """`python -m distill.tools.gpu_suite --tiny`: each row is a real fit (a warm-up epoch and a timed one; a staged
    method is stopped after it, its stages being longer), the every-view cache row reports its views, and two
    concurrent runs report their summed rate."""
    from distill.tools import gpu_suite

    out = tmp_path / "suite.json"
    records = gpu_suite.main(["--tiny", "--only", "BaselineKD+views on tiny_mlp, batch 16", "ResidualKD/assistant",
                              "Supervised on tiny_mlp, batch 16", "--concurrent", "2", "--no-step-bounds",
                              "--json", str(out), "--markdown", str(tmp_path / "suite.md")])
    rows = {r["row"]: r for r in records}
    # the quick rows issue 20's targets name, the concurrent runs (a target too), the cache rows, then the others
    assert [r["row"] for r in records] == [
        "Supervised on tiny_mlp, batch 16", "Supervised on tiny_mlp, batch 16, compiled (reduce-overhead)",
        "2 × Supervised on tiny_mlp, batch 16", "BaselineKD+views on tiny_mlp, batch 16",
        "BaselineKD+views on tiny_mlp, batch 16, compiled (reduce-overhead)", "ResidualKD/assistant on tiny_mlp, batch 16"]
    assert set(rows) == {"BaselineKD+views on tiny_mlp, batch 16", "ResidualKD/assistant on tiny_mlp, batch 16",
                         "BaselineKD+views on tiny_mlp, batch 16, compiled (reduce-overhead)",
                         "Supervised on tiny_mlp, batch 16", "Supervised on tiny_mlp, batch 16, compiled (reduce-overhead)",
                         "2 × Supervised on tiny_mlp, batch 16"}
    loops = [r for r in records if r["kind"] == "loop"]
    assert all(r["timed_steps"] == 3 and r["images_per_s"] > 0 for r in loops)
    # what torch.compile did: nothing in an eager row; in a compiled one graphs, none with a CUDA graph on a CPU
    assert all(r["graphs"] == 0 and r["cudagraph_skips"] == 0 for r in loops if not r["compile"])
    compiled = rows["Supervised on tiny_mlp, batch 16, compiled (reduce-overhead)"]
    assert compiled["graphs"] >= 1 and compiled["cudagraph_skips"] >= 1 and compiled["graph_breaks"] == 0
    assert rows["BaselineKD+views on tiny_mlp, batch 16"]["views"] == 18  # 8 px: pad 1, 3 x 3 offsets x 2 flips
    assert rows["2 × Supervised on tiny_mlp, batch 16"]["images_per_s"] > 0
    saved = json.loads(out.read_text())
    assert saved["failures"] == [] and len(saved["records"]) == len(records) and saved["finished"] is True
    table = (tmp_path / "suite.md").read_text()
    assert "| 2 × Supervised on tiny_mlp, batch 16 |" in table
    assert f"| {compiled['graphs']} graphs, {compiled['cudagraph_skips']} without a CUDA graph |" in table


def test_a_gpu_suite_killed_mid_run_leaves_the_rows_it_measured(tmp_path, monkeypatch):
    """The device call's time limit kills the suite where it is: the JSON and Markdown written after each row keep
    what it measured, marked unfinished."""
    from distill.tools import gpu_suite

    real, calls = gpu_suite.measure_row, []

    def measure_row(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:  # the warm-up fit, the first row, then the kill
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_suite, "measure_row", measure_row)
    out, table = tmp_path / "suite.json", tmp_path / "suite.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.main(["--tiny", "--only", "Supervised on tiny_mlp, batch 16", "BaselineKD on tiny_mlp, batch 16",
                        "--concurrent", "0", "--no-step-bounds", "--json", str(out), "--markdown", str(table)])
    saved = json.loads(out.read_text())
    assert saved["finished"] is False
    assert [r["row"] for r in saved["records"]] == ["Supervised on tiny_mlp, batch 16"] == calls[1:2]
    assert "| Supervised on tiny_mlp, batch 16 |" in table.read_text()
    assert "had not finished" in table.read_text()


def test_the_gpu_suite_times_the_gpus_wait_between_steps_from_events(monkeypatch):
    """The GPU's wait is the sum, over the timed epoch, of the time from each step's end event to the next step's
    start event (the first step's start has no predecessor); events stand in here for CUDA ones, stamped with the
    host clock when queued."""
    import time
    from types import SimpleNamespace

    from distill.tools import gpu_suite

    class Stamp:
        def __init__(self) -> None:
            self.at = time.perf_counter()

        def elapsed_time(self, later: "Stamp") -> float:  # milliseconds, as torch.cuda.Event's
            return (later.at - self.at) * 1000

    timer = gpu_suite.LoopTimer(torch.device("cpu"))
    monkeypatch.setattr(timer, "_event", Stamp)
    trainer, batch = SimpleNamespace(current_epoch=1, should_stop=False), (torch.zeros(4, 1),)
    timer.on_train_epoch_start(trainer, None)
    for step in range(3):
        if step:
            time.sleep(0.05)  # between steps: the GPU would be waiting
        timer.on_train_batch_start(trainer, None, batch, step)
        time.sleep(0.02)  # the step itself
        timer.on_train_batch_end(trainer, None, None, batch, step)
    timer.on_train_epoch_end(trainer, None)
    # the two 50 ms gaps, and not the steps' 20 ms (0.16 s with them)
    assert 0.1 <= timer.device_wait < 0.15, timer.device_wait
    assert timer.steps == 3 and trainer.should_stop


def test_the_full_loop_rows_on_cifar10_jpeg_need_its_copy_and_say_so_before_any_row(tmp_path, monkeypatch):
    """Asked for explicitly, a missing CIFAR-10 JPEG copy is one error before the step rows (it used to end a long
    run with a traceback and no JSON); by default its rows are left out with a note."""
    from distill.errors import DataNotFoundError

    missing, present = tmp_path / "none", tmp_path / "cifar"
    (present / "train").mkdir(parents=True)
    assert bench.parse_args(["--cifar-jpeg-dir", str(missing)]).fit == ["mnist5k"]
    assert bench.parse_args(["--cifar-jpeg-dir", str(present)]).fit == ["mnist5k", "cifar10-jpeg"]
    assert bench.parse_args(["--quick", "--cifar-jpeg-dir", str(missing)]).fit == []
    monkeypatch.setattr(bench, "run", lambda *args: pytest.fail("a row ran before the data check"))
    with pytest.raises(DataNotFoundError, match=f"--fit cifar10-jpeg needs the CIFAR-10 JPEG copy .* at {missing}"):
        bench.main(["--pairs", "--fit", "cifar10-jpeg", "--cifar-jpeg-dir", str(missing), "--json",
                    str(tmp_path / "out.json")])
