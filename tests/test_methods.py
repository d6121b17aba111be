"""Method invariants: the teacher stays frozen and out of checkpoints; results are written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import fake_datamodule, tiny_trainer, write_teacher, in_training_losses
from distill.errors import CheckpointError, ConfigError
from distill.methods import BaselineKD, Supervised
from distill.run import finish_fit
from distill.teachers import load_network, sha256_of

DATA = dict(num_classes=10, in_channels=3, image_size=16)


def kd_module(teacher, **kwargs) -> BaselineKD:
    return BaselineKD(student="resnet8", teacher=str(teacher), **{**DATA, **kwargs})


def test_teacher_unchanged_frozen_and_not_optimised(tmp_path, teacher_file):
    model = kd_module(teacher_file)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)
    seen_modes = []

    original = model.teacher_logits

    def spy(images):
        seen_modes.append(model.teacher.training)
        out = original(images)
        assert not out.requires_grad
        return out

    model.teacher_logits = spy
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=fake_datamodule())

    assert seen_modes and not any(seen_modes)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm buffers bit-identical
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.teacher.parameters()}
    assert optimised == {id(p) for p in model.student.parameters()}


def test_checkpoints_hold_no_teacher_and_resume(tmp_path, teacher_file):
    model = kd_module(teacher_file)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=fake_datamodule())
    ckpt_dir = tmp_path / "run" / "version_0" / "checkpoints"
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert {f.name for f in files} >= {"last.ckpt"} and len(files) == 2
    for file in files:
        checkpoint = torch.load(file, weights_only=True)
        assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
        assert any(k.startswith("student.") for k in checkpoint["state_dict"])
        assert checkpoint["teacher"]["sha256"] == sha256_of(teacher_file)
        assert "method" not in checkpoint["hyper_parameters"]  # it would go back into __init__
    # the loggers' hparams (TensorBoard's hparams view) name the method, so runs can be filtered by it
    assert "method: BaselineKD" in (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()

    resumed = kd_module(teacher_file)
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    trainer.fit(resumed, datamodule=fake_datamodule(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.current_epoch == 3

    other = write_teacher(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(CheckpointError, match="resume with the original teacher"):
        tiny_trainer(tmp_path, max_epochs=4).fit(kd_module(other), datamodule=fake_datamodule(),
                                                 ckpt_path=str(ckpt_dir / "last.ckpt"))


def test_finish_fit_writes_results_and_exports_a_teacher(tmp_path, teacher_file):
    model = kd_module(teacher_file)
    trainer = tiny_trainer(tmp_path)
    dm = fake_datamodule()
    fit_started = time.time()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.time() - fit_started
    results = finish_fit(trainer, model, dm, seed=0)
    assert results["wall_time_s"] >= 0.9 * fit_seconds  # covers the fit, not only the final test
    run_dir = tmp_path / "run" / "version_0"
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["run_dir"] == str(run_dir)
    for key in ("best_val_acc", "test_acc", "epochs", "wall_time_s", "train_images_per_s", "seed", "config"):
        assert on_disk[key] is not None, key
    assert 0.0 <= on_disk["best_val_acc"] <= 1.0 and 0.0 <= on_disk["test_acc"] <= 1.0
    assert on_disk["epochs"] == 2 and on_disk["train_images_per_s"] > 0
    assert on_disk["teacher"]["sha256"] == sha256_of(teacher_file)
    assert results["test_acc"] == on_disk["test_acc"]
    assert (tmp_path / "run" / "latest").resolve() == run_dir.resolve()

    # the exported network is the best-validation checkpoint's student, and loads as a teacher
    loaded = load_network(run_dir / "model.safetensors", None, num_classes=10, image_size=16)
    best = torch.load(on_disk["best_checkpoint"], weights_only=True)["state_dict"]
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, best["student." + key]), key


def test_lightning_checkpoint_of_supervised_is_a_teacher(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(Supervised(student="takd_cnn2", **DATA), datamodule=fake_datamodule())
    ckpt = trainer.checkpoint_callback.best_model_path
    kd = kd_module(ckpt)
    assert kd.teacher_info["model"] == "takd_cnn2" and kd.teacher_info["path"] == ckpt
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in kd.teacher.state_dict().items():
        assert torch.equal(value, saved["student." + key]), key


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model"])
def test_plain_state_dict_teachers(tmp_path, wrapper):
    network = load_network(write_teacher(tmp_path / "t.safetensors"), None, num_classes=10).network
    state = network.state_dict()
    obj = {"plain": state, "state_dict": {"state_dict": state}, "model": {"model": state, "epoch": 240}}[wrapper]
    torch.save(obj, tmp_path / "t.pth")
    with pytest.raises(ConfigError, match="teacher_model"):
        kd_module(tmp_path / "t.pth")
    kd = kd_module(tmp_path / "t.pth", teacher_model="resnet8")
    for key, value in kd.teacher.state_dict().items():
        assert torch.equal(value, state[key])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file: proof of code execution
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to load"):
        kd_module(tmp_path / "evil.pth", teacher_model="resnet8")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".safetensors"])
def test_corrupt_or_missing_teacher(tmp_path, suffix):
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        kd_module(corrupt, teacher_model="resnet8")
    with pytest.raises(CheckpointError, match="does not exist"):
        kd_module(tmp_path / f"missing{suffix}")


def test_teacher_for_other_class_count(tmp_path):
    teacher = write_teacher(tmp_path / "t100.safetensors", num_classes=100)
    with pytest.raises(CheckpointError, match="100 classes but the data has 10"):
        kd_module(teacher)
    state = load_network(teacher, None, num_classes=100).network.state_dict()
    torch.save(state, tmp_path / "t100.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        kd_module(tmp_path / "t100.pth", teacher_model="resnet8")


def test_teacher_model_must_match_file(teacher_file):
    with pytest.raises(CheckpointError, match="teacher_model"):
        kd_module(teacher_file, teacher_model="resnet20")


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"),
])
def test_invalid_kd_hyperparameters(teacher_file, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        kd_module(teacher_file, **kwargs)


def test_kd_training_step_logs_loss_parts(tmp_path, teacher_file):
    model = kd_module(teacher_file)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=fake_datamodule())
    logged = trainer.logged_metrics
    for key in ("train/loss_epoch", "train/loss_ce_epoch", "train/loss_kd_epoch", "train/acc", "val/acc",
                "val/acc_top5", "val/agreement", "val/kl", "val/acc_best", "lr"):
        assert key in logged, key
    assert 0.0 <= float(logged["val/agreement"]) <= 1.0 and float(logged["val/kl"]) >= 0.0


def test_cached_teacher_outputs_train_the_same_student_without_running_the_teacher(tmp_path, teacher_file):
    """With augment none, cached teacher logits give bit-for-bit the training of the uncached run."""
    def fit(cache: bool, root: str):
        torch.manual_seed(0)
        model = kd_module(teacher_file, cache_teacher_outputs=cache)
        forwards, stepping = {"train": 0}, in_training_losses(model)
        model.teacher.register_forward_hook(
            lambda *_: forwards.__setitem__("train", forwards["train"] + stepping[0]))
        trainer = tiny_trainer(tmp_path / root, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=fake_datamodule(augment="none"))
        return model, forwards["train"]

    cached, cached_forwards = fit(True, "cached")
    plain, plain_forwards = fit(False, "plain")
    assert cached_forwards == 0 and plain_forwards > 0
    assert cached.cached_logits is not None and cached.cached_logits.shape == (96, 10)
    for (name, a), b in zip(cached.student.state_dict().items(), plain.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(list((tmp_path / "teacher_cache").glob("*.safetensors"))) == 1  # trainer.default_root_dir = cwd


def test_every_view_cache_gives_the_online_teachers_targets_on_augmented_resident_data(tmp_path, teacher_file):
    """Device-resident data with the cifar augmentation (16 px: pad 2, 5 × 5 offsets × 2 flips = 50 views): the
    cache holds the teacher's logits for every view of every image; each step's looked-up targets equal the
    online teacher's on the step's own augmented images, and the student trains as with the online teacher."""
    def fit(cache: bool, root: str):
        torch.manual_seed(0)
        model = kd_module(teacher_file, cache_teacher_outputs=cache)
        forwards, stepping = {"train": 0}, in_training_losses(model)
        model.teacher.register_forward_hook(
            lambda *_: forwards.__setitem__("train", forwards["train"] + stepping[0]))
        looked_up = model.training_teacher_logits
        gaps = []

        def compared(batch):
            targets = looked_up(batch)
            if cache:
                stepping[0] = False  # the comparison's own teacher pass is not the method's
                gaps.append((targets - model.teacher_logits(batch.images)).abs().max().item())
                stepping[0] = True
            return targets

        model.training_teacher_logits = compared
        trainer = tiny_trainer(tmp_path / root, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=fake_datamodule(augment="cifar", device_resident=True))
        return model, forwards["train"], gaps

    cached, cached_forwards, gaps = fit(True, "cached")
    plain, plain_forwards, _ = fit(False, "plain")
    assert cached_forwards == 0 and plain_forwards > 0
    assert cached.cached_logits.shape == (96, 50, 10)
    assert len(gaps) == 6 and max(gaps) < 1e-5, gaps
    for (name, a), b in zip(cached.student.state_dict().items(), plain.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_every_view_of_an_image_is_a_different_image_and_a_training_batch_holds_the_view_it_names():
    """BatchAugment's view numbers: the 162 views of a 32-px image (9 × 9 offsets × 2 flips) are 162 different
    images, and a resident training batch's images are exactly its images in the views the batch names."""
    from distill.data.resident import BatchAugment, DeviceResidentLoader

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    augment = BatchAugment("cifar", 32)
    assert augment.views == 162
    every = augment.apply(images[:1].expand(162, -1, -1, -1), torch.arange(162))
    assert len({tuple(view.flatten().tolist()) for view in every}) == 162
    loader = DeviceResidentLoader(images, torch.zeros(40, dtype=torch.int64), batch_size=16, mean=[0.5] * 3,
                                  std=[0.25] * 3, shuffle=True, preset="cifar", seed=3, with_views=True)
    in_order = DeviceResidentLoader(images, torch.zeros(40, dtype=torch.int64), batch_size=16, mean=[0.5] * 3,
                                    std=[0.25] * 3, shuffle=False)
    by_view = {view: torch.cat([b[0] for b in in_order.in_view(augment, view)]) for view in range(162)}
    batches = list(loader)
    assert sum(len(b[2]) for b in batches) == 40 and len({v for b in batches for v in b[3].tolist()}) > 20
    for images_, _, indices, views in batches:
        expected = torch.stack([by_view[int(v)][int(i)] for i, v in zip(indices, views)])
        assert torch.equal(images_, expected)


def test_teacher_cache_needs_unaugmented_data(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="augment.*device_resident: true"):  # per-image views are not enumerated
        tiny_trainer(tmp_path).fit(kd_module(teacher_file, cache_teacher_outputs=True),
                                   datamodule=fake_datamodule(augment="cifar"))
    with pytest.raises(ConfigError, match="cache_teacher_outputs"):
        kd_module(teacher_file, teacher_cache="x.safetensors")


def test_eval_teacher_cache_gives_the_same_metrics_without_running_the_teacher(tmp_path, teacher_file):
    """EvalTeacherCache: val/test agreement and KL as without it; the teacher runs once per split, and not at
    all in a second run with the same teacher and data (the files are shared)."""
    from distill.callbacks import EvalTeacherCache

    def run(cache: bool, root: str):
        torch.manual_seed(0)
        model = kd_module(teacher_file)
        forwards = {"eval": 0}
        model.teacher.register_forward_hook(
            lambda *_: forwards.__setitem__("eval", forwards["eval"] + (not model.trainer.training)))
        trainer = tiny_trainer(tmp_path / root, max_epochs=2, num_sanity_val_steps=0,
                               callbacks=[EvalTeacherCache(cache_dir=str(tmp_path / "eval_cache"))] if cache else [])
        data = fake_datamodule(augment="none")
        trainer.fit(model, datamodule=data)
        validated = dict(trainer.logged_metrics)
        tested = trainer.test(model, datamodule=data, verbose=False)[0]
        return validated, tested, forwards["eval"]

    plain, plain_test, plain_forwards = run(False, "plain")
    cached, cached_test, cached_forwards = run(True, "cached")
    for key in ("val/agreement", "val/kl", "val/acc"):
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ("test/agreement", "test/kl", "test/acc"):
        assert abs(cached_test[key] - plain_test[key]) < 1e-5, key
    # 48 val and 48 test images, 2 batches each: without the cache the teacher runs on 2 val passes + 1 test
    # pass, with it once over val and once over test
    assert plain_forwards == 2 * 2 + 2 and cached_forwards == 2 + 2
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "eval_cache").glob("*.safetensors")) == ["test", "val"]
    _, _, again = run(True, "again")
    assert again == 0


@pytest.mark.parametrize("clip", [None, 0.5])
def test_trainer_gradient_clipping_applies_to_every_method(tmp_path, clip):
    """The Trainer's gradient_clip_val clips (norm) a DistillModule's gradients; without it nothing is clipped."""
    norms = []

    class Recorder(Supervised):
        def training_losses(self, batch):
            logits, losses = super().training_losses(batch)
            return logits, {**losses, "loss": losses["loss"] * 1e4}  # gradients far above any clip

        def on_train_start(self):
            super().on_train_start()
            # SGD leaves .grad alone, so after the step the gradients are those Lightning clipped (or not)
            self.trainer.optimizers[0].register_step_post_hook(lambda *_: norms.append(
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.student.parameters()]))))

    model = Recorder(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                           gradient_clip_val=clip)
    trainer.fit(model, datamodule=fake_datamodule())
    assert norms and (norms[0] <= 0.5 + 1e-4 if clip else norms[0] > 10)


def test_each_method_declares_only_its_own_arguments():
    """Issue 17: a method's constructor lists only what differs from its base class; the student, the teacher,
    the sizes and the optimiser come through **kwargs (so --help, --print_config and checkpoints still see them)."""
    import inspect

    from distill.methods import METHODS, DistillModule, TeacherStudentModule

    def own(cls: type) -> set[str]:
        return {name for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}

    shared = set(inspect.signature(DistillModule.__init__).parameters) | own(TeacherStudentModule)
    for name, cls in METHODS.items():
        parameters = inspect.signature(cls.__init__).parameters
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), name
        assert not own(cls) & shared, (name, own(cls) & shared)


@pytest.mark.parametrize("args", [["--model.help", "DKD"], ["--model", "DKD", "--help"], ["--model=DKD", "-h"]])
def test_help_of_one_method_lists_its_own_and_the_inherited_arguments(capsys, args):
    from distill.cli import main

    with pytest.raises(SystemExit):
        main(["fit", *args])
    text = capsys.readouterr().out
    for argument in ("--model.beta", "--model.warmup_epochs", "--model.teacher", "--model.student", "--model.optimizer"):
        assert argument in text, argument
    assert "--trainer.max_epochs" not in text  # the method's help, not the whole command's


def test_tensorboard_events_hold_the_hparams_summary_with_the_method_and_hp_metric(tmp_path, teacher_file):
    """TensorBoard's HPARAMS tab reads a session summary from the events files: the run's hyperparameters
    (the method's name included) and hp_metric, the best validation accuracy."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    trainer = tiny_trainer(tmp_path)
    trainer.fit(kd_module(teacher_file), datamodule=fake_datamodule())
    sessions, hp_metric = [], []
    for events in (tmp_path / "run" / "version_0").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        sessions.append(data.session_start_info.hparams)
                elif value.tag == "hp_metric":
                    hp_metric.append(value.tensor.float_val[0] if value.tensor.float_val else value.simple_value)
    assert sessions and sessions[0]["method"].string_value == "BaselineKD"
    assert sessions[0]["temperature"].number_value == 4.0
    assert hp_metric and 0.0 <= hp_metric[-1] <= 1.0  # the best validation accuracy, after the -1 placeholder


def test_the_learning_rate_of_each_logged_step_is_logged(tmp_path):
    """With a warm-up, the per-epoch `lr` hides the ramp; `lr_step` shows the rate each logged step used."""
    import csv
    from functools import partial

    from distill.methods import Supervised
    from distill.optim import WarmupCosine

    model = Supervised(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16,
                       optimizer=partial(torch.optim.SGD, lr=0.4), lr_scheduler=partial(WarmupCosine, warmup_steps=2))
    tiny_trainer(tmp_path, max_epochs=2, log_every_n_steps=1).fit(model, datamodule=fake_datamodule())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("lr_step")]
    rates = [float(row["lr_step"]) for row in sorted(rows, key=lambda row: int(row["step"]))]
    assert rates[:2] == pytest.approx([0.0, 0.2]) and len(rates) == 6  # 3 batches a epoch, warm-up over 2 steps


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("total, pct_start", [(100, 0.15), (37, 0.3), (12, 0.5)])
def test_one_cycle_is_torchs_one_cycle_lr_with_the_runs_length(optimizer, total, pct_start):
    """distill.optim.OneCycle, told the run's length after it is built, steps the rate and the momentum (SGD's
    momentum, Adam's beta1) exactly as torch's OneCycleLR built with that length."""
    from distill.optim import OneCycle

    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
            "adam": lambda p: torch.optim.Adam(p, lr=0.003)}[optimizer]
    ours, theirs = make([torch.nn.Parameter(torch.zeros(2))]), make([torch.nn.Parameter(torch.zeros(2))])
    schedule = OneCycle(ours, pct_start=pct_start)
    schedule.set_run_length(total)
    reference = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=theirs.defaults["lr"], total_steps=total,
                                                    pct_start=pct_start)
    momentum = (lambda g: g["momentum"]) if optimizer == "sgd" else (lambda g: g["betas"][0])
    for _ in range(total):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        assert momentum(ours.param_groups[0]) == pytest.approx(momentum(theirs.param_groups[0]), rel=1e-12)
        ours.step(), theirs.step(), schedule.step(), reference.step()


def test_one_cycle_spans_the_fit_it_is_given(tmp_path):
    """In a fit, OneCycle takes the run's optimiser steps as its length: the rates torch's OneCycleLR gives a
    9-step run, ending at max_lr / (div_factor * final_div_factor)."""
    import csv
    from functools import partial

    from distill.methods import Supervised
    from distill.optim import OneCycle

    model = Supervised(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16,
                       optimizer=partial(torch.optim.SGD, lr=0.4, momentum=0.9),
                       lr_scheduler=partial(OneCycle, pct_start=0.5))
    trainer = tiny_trainer(tmp_path, max_epochs=3, log_every_n_steps=1)  # 3 batches an epoch: 9 steps
    trainer.fit(model, datamodule=fake_datamodule())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("lr_step")]
    rates = [float(row["lr_step"]) for row in sorted(rows, key=lambda row: int(row["step"]))]
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.4, total_steps=9, pct_start=0.5)
    expected = []
    for _ in range(9):
        expected.append(reference.param_groups[0]["lr"])
        reference.step(), schedule.step()
    assert rates == pytest.approx(expected, rel=1e-6)  # logged as float32
    assert rates[-1] == pytest.approx(0.4 / 25 / 1e4, rel=1e-6)  # the last step's rate


def test_cosine_annealing_takes_its_length_from_the_run_or_the_stage(tmp_path, teacher_file):
    """distill.optim.CosineAnnealing: torch's cosine with T_max = the run's epochs (staged: the stage's), so a
    shortened run still ends decayed; with T_max given it is CosineAnnealingLR exactly."""
    import csv
    import math
    from functools import partial

    from distill.methods import Supervised, TeacherAssistantKD
    from distill.optim import CosineAnnealing

    def epoch_rates(root, model, epochs):
        trainer = tiny_trainer(root, max_epochs=epochs)
        trainer.fit(model, datamodule=fake_datamodule())
        with open(root / "run" / "version_0" / "metrics.csv") as handle:
            rates = [float(row["lr"]) for row in csv.DictReader(handle) if row.get("lr")]
        return rates, trainer.optimizers[0].param_groups[0]["lr"]

    sgd = partial(torch.optim.SGD, lr=0.4)
    rates, final = epoch_rates(tmp_path / "a", Supervised(student="mlp_30_30", image_size=16, optimizer=sgd,
                                                          lr_scheduler=CosineAnnealing), 3)
    assert rates == pytest.approx([0.4 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    assert final == pytest.approx(0.0, abs=1e-12)  # decayed at the end of the (shortened) run
    given, _ = epoch_rates(tmp_path / "b", Supervised(student="mlp_30_30", image_size=16, optimizer=sgd,
                                                      lr_scheduler=partial(CosineAnnealing, T_max=6)), 3)
    assert given == pytest.approx([0.4 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(3)])
    staged = TeacherAssistantKD(student="resnet8", assistants=["resnet8"], stage_epochs=[2, 1], teacher=str(teacher_file),
                                image_size=16, optimizer=sgd, lr_scheduler=CosineAnnealing)
    rates, _ = epoch_rates(tmp_path / "c", staged, 3)
    assert rates == pytest.approx([0.4, 0.2, 0.4])  # each stage restarts its own cosine over its own epochs


def test_multistep_milestones_and_a_given_cosine_scale_with_the_run_or_its_first_stage(tmp_path, teacher_file):
    """distill.optim.MultiStep / CosineAnnealing with of_epochs: a recipe's epoch numbers for a run of of_epochs
    epochs, scaled to the run's (staged: first stage's) length, the same factor in every stage."""
    import csv
    import math
    from functools import partial

    from distill.methods import Supervised, TeacherAssistantKD
    from distill.optim import CosineAnnealing, MultiStep

    def epoch_rates(root, model, epochs):
        tiny_trainer(root, max_epochs=epochs).fit(model, datamodule=fake_datamodule())
        with open(root / "run" / "version_0" / "metrics.csv") as handle:
            return [float(row["lr"]) for row in csv.DictReader(handle) if row.get("lr")]

    sgd = partial(torch.optim.SGD, lr=0.4)
    recipe = partial(MultiStep, milestones=[4, 6], gamma=0.1, of_epochs=8)
    shortened = epoch_rates(tmp_path / "a", Supervised(student="mlp_30_30", image_size=16, optimizer=sgd,
                                                       lr_scheduler=recipe), 4)
    assert shortened == pytest.approx([0.4, 0.4, 0.04, 0.004])  # milestones 2 and 3 of 4 epochs
    fixed = epoch_rates(tmp_path / "b", Supervised(student="mlp_30_30", image_size=16, optimizer=sgd,
                                                   lr_scheduler=partial(MultiStep, milestones=[2], of_epochs=None)), 4)
    assert fixed == pytest.approx([0.4, 0.4, 0.04, 0.04])  # of_epochs null: MultiStepLR as given
    staged = TeacherAssistantKD(student="resnet8", assistants=["resnet8"], stage_epochs=[2, 3], teacher=str(teacher_file),
                                image_size=16, optimizer=sgd, lr_scheduler=partial(MultiStep, milestones=[2], of_epochs=4))
    # first stage 2 of the recipe's 4 epochs: milestone 1 in both stages (scaled by stage 2's own 3 epochs it were 2)
    assert epoch_rates(tmp_path / "c", staged, 5) == pytest.approx([0.4, 0.04, 0.4, 0.04, 0.04])
    cosine = TeacherAssistantKD(student="resnet8", assistants=["resnet8"], stage_epochs=[2, 1], teacher=str(teacher_file),
                                image_size=16, optimizer=sgd,
                                lr_scheduler=partial(CosineAnnealing, T_max=8, of_epochs=8))
    # the recipe's stages 8 + 4 under a cosine of 8 epochs, shortened to 2 + 1: T_max 2 in each stage
    assert epoch_rates(tmp_path / "d", cosine, 3) == pytest.approx([0.4, 0.4 * (1 + math.cos(math.pi / 2)) / 2, 0.4])


def test_schedules_of_other_lengths_check_their_arguments():
    from distill.optim import CosineAnnealing, MultiStep, scaled_epoch

    assert [scaled_epoch(m, 24, 240) for m in (150, 180, 210)] == [15, 18, 21]
    assert [scaled_epoch(m, 4, 240) for m in (150, 180, 210)] == [3, 3, 4]  # rounded half up: 2.5 -> 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="MultiStep of_epochs=0 must be a positive number of epochs"):
        MultiStep(optimizer, milestones=[1], of_epochs=0)
    with pytest.raises(ConfigError, match="of_epochs scales a given T_max"):
        CosineAnnealing(optimizer, of_epochs=10)


def test_a_fit_of_no_step_exports_nothing_and_leaves_latest_alone(tmp_path):
    """From Python (the CLI refuses such a fit before work): results.json says so, no model, `latest` untouched."""
    from distill.run import run_loggers

    root = tmp_path / "runs"
    trained = Supervised(student="mlp_30_30", image_size=16)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=run_loggers(root, "r"), enable_progress_bar=False)
    trainer.fit(trained, datamodule=fake_datamodule())
    first = finish_fit(trainer, trained, fake_datamodule())
    assert first["model_file"] and (root / "r" / "latest").resolve() == Path(first["run_dir"]).resolve()
    untrained = Supervised(student="mlp_30_30", image_size=16)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0, accelerator="cpu", logger=run_loggers(root, "r"),
                        enable_progress_bar=False)
    trainer.fit(untrained, datamodule=fake_datamodule())
    with pytest.warns(UserWarning, match="took no optimiser step, so no model.safetensors"):
        second = finish_fit(trainer, untrained, fake_datamodule())
    assert second["model_file"] is None and second["global_steps"] == 0
    assert not (Path(second["run_dir"]) / "model.safetensors").exists()
    assert json.loads((Path(second["run_dir"]) / "results.json").read_text())["model_file"] is None
    assert (root / "r" / "latest").resolve() == Path(first["run_dir"]).resolve()  # still the trained run
