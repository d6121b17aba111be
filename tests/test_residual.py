"""ResidualKD: staged S/A optimisation, the residual target, export, budget, robustness, CLI, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, StopAfter, fake_datamodule, tiny_trainer, write_teacher, training_batch
from distill.cli import main as distill_main
from distill.errors import ConfigError
from distill.methods import BaselineKD, ResidualKD
from distill.models import create_model
from distill.models.budget import derive_pair, pair_cost
from distill.tools.residual_budget import main as budget_main
from distill.tools.robustness import fgsm, pgd, robust_accuracy
from distill.run import finish_fit
from distill.teachers import load_network

GEOMETRY = dict(num_classes=10, in_channels=3, image_size=16)
# S = resnet8 at half width (a connector 32→64 channels), A = resnet8 at a quarter width
EXPLICIT = dict(student="resnet8", student_kwargs={"width": 0.5}, assistant="resnet8", assistant_kwargs={"width": 0.25})


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def residual_module(teacher, stage_epochs=(2, 2), **kwargs) -> ResidualKD:
    options = dict(EXPLICIT, stage_epochs=list(stage_epochs), teacher=str(teacher), optimizer=sgd)
    return ResidualKD(**{**options, **GEOMETRY, **kwargs})


def batch(seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ----------------------------------------------------------------------------- M.1: who learns when
def test_m1_stages_train_only_one_of_s_and_a(tmp_path, teacher_file):
    L.seed_everything(0)
    model = residual_module(teacher_file)
    pair = model.student
    seen = []  # per step: stage, S and A weights (buffers included), gradients, modes, optimised parameters

    original = model.training_losses

    def spy(batch):
        optimised = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
        seen.append(dict(stage=model.stage_name, s=snapshot(pair.student), a=snapshot(pair.assistant),
                         s_grads=[p.grad for p in pair.student.parameters()],
                         a_grads=[p.grad for p in pair.assistant.parameters()],
                         s_training=pair.student.training, a_training=pair.assistant.training, optimised=optimised))
        return original(batch)

    model.training_losses = spy
    trainer = tiny_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=fake_datamodule())

    unused = {id(pair.get_parameter(name)) for name in pair.unused}  # S's and A's own classifiers
    assert len(unused) == 4
    s_ids = {id(p) for p in [*pair.student.parameters(), *pair.student_connector.parameters()]} - unused
    a_ids = {id(p) for p in [*pair.assistant.parameters(), *pair.assistant_connector.parameters()]} - unused
    stage1 = [s for s in seen if s["stage"] == "student"]
    stage2 = [s for s in seen if s["stage"] == "assistant"]
    assert len(stage1) == len(stage2) == 6  # 3 batches × 2 epochs each
    for step in stage1:  # stage 1: A fixed (weights and BatchNorm statistics), no gradients, not optimised
        assert all(torch.equal(v, stage1[0]["a"][k]) for k, v in step["a"].items())
        assert all(g is None for g in step["a_grads"]) and not step["a_training"]
        assert step["optimised"] == s_ids and step["s_training"]
    for step in stage2:  # stage 2: S fixed, no gradients, not optimised
        assert all(torch.equal(v, stage2[0]["s"][k]) for k, v in step["s"].items())
        assert all(g is None for g in step["s_grads"]) and not step["s_training"]
        assert step["optimised"] == a_ids and step["a_training"]
    assert all(p.grad is None for p in pair.student.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not torch.equal(stage2[0]["s"]["conv1.weight"], stage1[0]["s"]["conv1.weight"])  # S learnt in stage 1
    assert not unchanged(pair.assistant, stage2[0]["a"])  # and A in stage 2


def test_residual_target_comes_from_the_frozen_student(teacher_file):
    model = residual_module(teacher_file)
    model.enter_stage(1)  # stage 2: A learns the residual
    pair = model.student
    images, labels = batch()
    pair.student.train()  # must not matter: the frozen S is evaluated in eval mode during training
    model.train()
    _, losses = model.training_losses(training_batch(images, labels))

    # independent computation: teacher and S in eval mode, no graph
    with torch.no_grad():
        f_t = model.teacher.eval().forward_features(images)[-1]
        f_s = pair.student_connector(pair.student.eval().forward_features(images)[-1])
    f_a = pair.assistant_connector(pair.assistant.forward_features(images)[-1])
    # squared l2 distance per position: summed over channels, averaged over positions and the batch
    expected = ((f_a - (f_t - f_s)) ** 2).sum() / (len(images) * f_t.shape[2] * f_t.shape[3])
    torch.testing.assert_close(losses["loss_assistant"], expected)
    torch.testing.assert_close(losses["residual_norm"], (f_t - f_s).flatten(1).norm(dim=1).mean())
    torch.testing.assert_close(losses["remaining_norm"], (f_t - f_s - f_a.detach()).flatten(1).norm(dim=1).mean())
    assert set(losses) == {"loss", "loss_assistant", "residual_norm", "remaining_norm"}

    losses["loss"].backward()
    assert all(p.grad is None for p in pair.student.parameters())  # no graph through S
    assert all(p.grad is not None for n, p in pair.assistant.named_parameters() if not n.startswith("fc."))
    # (zero while A's connector is still at its zero start; the connector itself learns first)
    assert all(p.grad.abs().sum() > 0 for p in pair.assistant_connector.parameters())


def test_stage_one_runs_the_assistant_only_while_it_adds_something(teacher_file):
    """Stage 1 logs the remaining norm ‖f_T − c_S(f_S) − c_A(f_A)‖: while A's connector is at its zero
    start that is the residual norm, without a forward pass of A; after any change to the connector
    (here an in-place write, as a checkpoint load makes), A runs again."""
    model = residual_module(teacher_file)
    pair = model.student
    forwards = []
    pair.assistant_connector.register_forward_hook(lambda *_: forwards.append(1))
    images, labels = batch(2)
    model.eval()
    _, losses = model.training_losses(training_batch(images, labels))
    assert not forwards and torch.equal(losses["remaining_norm"], losses["residual_norm"])
    with torch.no_grad():
        pair.assistant_connector.map.bias.fill_(0.5)
    _, losses = model.training_losses(training_batch(images, labels))
    assert forwards
    with torch.no_grad():
        f_t = model.teacher.forward_features(images)[-1]
        f_s = pair.student_connector(pair.student.forward_features(images)[-1])
        f_a = pair.assistant_connector(pair.assistant.forward_features(images)[-1])
    torch.testing.assert_close(losses["remaining_norm"], (f_t - f_s - f_a).flatten(1).norm(dim=1).mean())


def test_stage_one_is_feature_mimicking_and_untrained_assistant_adds_nothing(teacher_file):
    model = residual_module(teacher_file)
    pair = model.student
    images, labels = batch(1)
    model.eval()
    logits, losses = model.training_losses(training_batch(images, labels))
    with torch.no_grad():
        f_t = model.teacher.forward_features(images)[-1]
        f_s = pair.student_connector(pair.student.forward_features(images)[-1])
        torch.testing.assert_close(losses["loss_student"], F.mse_loss(f_s, f_t) * f_t.shape[1])
        # A's connector starts at zero: S+A predicts exactly as S until stage 2
        torch.testing.assert_close(pair(images), pair.student_logits(images))
        torch.testing.assert_close(logits, pair.student_logits(images))
        # the classifier is the teacher's, frozen
        torch.testing.assert_close(pair.head(f_t), model.teacher.forward_head(f_t))
    assert not any(p.requires_grad for p in pair.head.parameters())


# ----------------------------------------------------------------------------- M.2 and M.3
def test_m2_adds_blocks_shallow_to_deep(teacher_file, monkeypatch):
    model = residual_module(teacher_file, stage_epochs=(3, 4), scheme="m2")
    assert len(model.teacher_shapes) == 3 and len(model.block_connectors["student"]) == 2
    weights = {}
    for epoch in range(7):
        model.enter_stage(model._stage_for_epoch(epoch))
        monkeypatch.setattr(ResidualKD, "current_epoch", property(lambda self, e=epoch: e))
        weights[epoch] = model._block_weights()
    monkeypatch.undo()
    assert weights == {0: [1, 0, 0], 1: [1, 1, 0], 2: [1, 1, 1],            # stage 1, E=3
                       3: [1, 0, 0], 4: [1, 0, 0], 5: [1, 1, 0], 6: [1, 1, 1]}  # stage 2, E=4

    model.enter_stage(1)
    monkeypatch.setattr(ResidualKD, "current_epoch", property(lambda self: 3))  # stage 2's first epoch: block 1
    images, labels = batch()
    model.train()
    _, losses = model.training_losses(training_batch(images, labels))
    pair = model.student
    with torch.no_grad():
        f_t = model.teacher.forward_features(images)[0]
        f_s = model.block_connectors["student"][0](pair.student.forward_features(images)[0])
    f_a = model.block_connectors["assistant"][0](pair.assistant.forward_features(images)[0])
    torch.testing.assert_close(losses["loss_assistant"], F.mse_loss(f_a, f_t - f_s) * f_t.shape[1])
    with pytest.raises(ConfigError, match="at least 3 epochs"):
        residual_module(teacher_file, stage_epochs=(2, 3), scheme="m2")


def test_m3_trains_s_and_a_jointly(teacher_file):
    model = residual_module(teacher_file, stage_epochs=(2,), scheme="m3")
    assert model.stage_names == ["joint"]
    trainable = {id(p) for m in model.trainable_modules() for p in m.parameters()}
    pair = model.student
    assert {id(p) for p in pair.student.parameters()} <= trainable and {id(p) for p in pair.assistant.parameters()} <= trainable
    images, labels = batch()
    model.train()
    _, losses = model.training_losses(training_batch(images, labels))
    losses["loss_assistant"].backward()  # the S+A error reaches S too (end to end)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())
    assert all(p.grad.abs().sum() > 0 for p in pair.assistant_connector.parameters())


def test_trained_classifier_learns_from_labels(tmp_path, teacher_file):
    model = residual_module(teacher_file, stage_epochs=(1, 1), classifier="trained")
    head = model.student.head
    before = snapshot(head)
    assert all(p.requires_grad for p in head.parameters())
    assert any(m is head for m in model.trainable_modules())
    images, labels = batch()
    model.train()
    _, losses = model.training_losses(training_batch(images, labels))
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(model.student.student_logits(images), labels))
    tiny_trainer(tmp_path, max_epochs=2).fit(model, datamodule=fake_datamodule())
    assert not unchanged(head, before)


# ----------------------------------------------------------------------------- results, export, resume
def test_results_report_s_alone_and_s_plus_a_and_export_predicts_the_same(tmp_path, teacher_file):
    L.seed_everything(0)
    model = residual_module(teacher_file, stage_epochs=(1, 2))
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    dm = fake_datamodule()
    trainer.fit(model, datamodule=dm)
    results = finish_fit(trainer, model, dm)

    views = {s["stage"]: s for s in results["stages"]}
    assert set(views) == {"student", "student_assistant"}
    for view in views.values():
        assert 0 <= view["best_val_acc"] <= 1 and 0 <= view["test_acc"] <= 1
    assert results["test_acc"] == views["student_assistant"]["test_acc"]
    assert views["student_assistant"]["cost"]["S+A"]["flops"] > views["student_assistant"]["cost"]["S (+connector)"]["flops"]
    metrics = (Path(results["run_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "val/acc_student", "train/residual_norm_epoch", "train/remaining_norm_epoch"} <= set(metrics)

    # the export is the S+A predictor: it loads without the method and predicts exactly as the module
    loaded = load_network(results["model_file"], None, **GEOMETRY)
    assert loaded.spec.model == "residual_pair"
    images, _ = batch(2, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.network.eval()(images), model.student(images), rtol=0, atol=0)
        # S alone, as tested, comes from the same file
        torch.testing.assert_close(loaded.network.student_logits(images), model.student.student_logits(images),
                                   rtol=0, atol=0)
    # and it teaches another run
    BaselineKD(student="resnet8", teacher=results["model_file"], **GEOMETRY)


def _run(tmp_path, teacher, name, ckpt_path=None, stop_after=None):
    L.seed_everything(3)
    model = residual_module(teacher, stage_epochs=(2, 3))
    trainer = tiny_trainer(tmp_path, name=name, max_epochs=5, callbacks=[StopAfter(stop_after)] if stop_after else [])
    dm = fake_datamodule()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return finish_fit(trainer, model, dm), model


def test_resume_in_the_middle_of_stage_two_matches_uninterrupted_run(tmp_path, teacher_file):
    full, model = _run(tmp_path, teacher_file, "full")
    _run(tmp_path, teacher_file, "cut", stop_after=3)  # stage 1 = epochs 0-1; stopped after epoch 1 of stage 2
    last = tmp_path / "cut" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["residual_kd"]["stage"] == 1
    resumed, resumed_model = _run(tmp_path, teacher_file, "cut", ckpt_path=str(last))
    for a, b in zip(full["stages"], resumed["stages"]):
        assert a["best_val_acc"] == b["best_val_acc"] and a["test_acc"] == b["test_acc"], (a, b)
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, resumed_model.student.state_dict()[key]), key


# ----------------------------------------------------------------------------- errors at start-up
def test_bad_configurations(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="scheme"):
        residual_module(teacher_file, scheme="m4")
    with pytest.raises(ConfigError, match="stage_epochs needs 2"):
        residual_module(teacher_file, stage_epochs=(3,))
    with pytest.raises(ConfigError, match="classifier"):
        residual_module(teacher_file, classifier="mine")
    mlp_teacher = write_teacher(tmp_path / "mlp.safetensors", model="mlp_30_30", image_size=16)
    with pytest.raises(ConfigError, match="cannot connect a feature of shape 32×4×4"):
        residual_module(mlp_teacher)  # maps cannot be paired with an MLP's vectors
    with pytest.raises(ConfigError, match="no `width` option|got unknown argument"):
        residual_module(teacher_file, student="takd_cnn2", student_kwargs=None, assistant=None)
    with pytest.raises(ConfigError, match="max_epochs"):
        tiny_trainer(tmp_path, max_epochs=3).fit(residual_module(teacher_file), datamodule=fake_datamodule())


def test_network_without_feature_maps_is_refused(tmp_path):
    teacher = write_teacher(tmp_path / "googlenet.safetensors", model="tv.googlenet", image_size=16)
    with pytest.raises(ConfigError, match="exposes no feature map"):
        residual_module(teacher)


# ----------------------------------------------------------------------------- S and A from one model
def test_derived_pair_fits_the_given_models_flops():
    pair_kwargs = derive_pair("resnet8", None, (64, 4, 4), **GEOMETRY, assistant_ratio=0.1)
    s_width, a_width = pair_kwargs["student_kwargs"]["width"], pair_kwargs["assistant_kwargs"]["width"]
    assert 0.5 < s_width < 1 and 0 < a_width < s_width
    pair = create_model("residual_pair", **GEOMETRY, **pair_kwargs).eval()
    cost = pair_cost(pair, create_model("resnet8", **GEOMETRY).eval(), 3, 16).rows
    assert cost["S+A"]["flops"] <= cost["given model"]["flops"]
    assert cost["A (+connector)"]["flops"] <= 0.1 * cost["S (+connector)"]["flops"]
    # S is as wide as the budget allows: one step wider would not fit
    wider = dict(pair_kwargs, student_kwargs={"width": s_width + 1 / 32})
    wider_cost = pair_cost(create_model("residual_pair", **GEOMETRY, **wider).eval(), None, 3, 16).rows
    assert wider_cost["S+A"]["flops"] > cost["given model"]["flops"]


def test_residual_budget_command(capsys):
    cost = budget_main(["resnet8", "--num-classes", "10", "--image-size", "16"])
    out = capsys.readouterr().out
    assert "| S+A |" in out and "within the budget of resnet8: yes" in out and cost.within_budget()


def test_width_option_keeps_the_published_networks():
    for name in ("resnet8x4", "wrn_16_2"):
        published, default = create_model(name, num_classes=100), create_model(name, num_classes=100, width=1.0)
        assert list(published.state_dict()) == list(default.state_dict())
        assert [v.shape for v in published.state_dict().values()] == [v.shape for v in default.state_dict().values()]
    assert create_model("wrn_16_2", num_classes=100, width=0.5).feature_channels == [16, 32, 64]
    assert create_model("tv.resnet18", num_classes=10, width=0.25).feature_channels == [16, 32, 64, 128]


# ----------------------------------------------------------------------------- robustness
@pytest.fixture
def trained_mlp():
    """A small MLP trained for a few hundred steps on the fake data (grey 8×8), and its test batches."""
    torch.manual_seed(0)
    dm = fake_datamodule(in_channels=1, image_size=8, fake_sizes=[256, 32, 128], batch_size=64)
    network = create_model("mlp_30_30", num_classes=10, in_channels=1, image_size=8)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    for _ in range(15):
        for images, labels, _ in dm.train_dataloader():
            optimiser.zero_grad()
            F.cross_entropy(network(images), labels).backward()
            optimiser.step()
    return network.eval(), list(dm.test_dataloader()), dm


def test_fgsm_and_pgd_lower_accuracy_as_eps_grows(trained_mlp):
    network, batches, dm = trained_mlp
    epsilons = [0.0, 0.02, 0.05, 0.1, 0.2]
    accuracy = robust_accuracy(network, batches, epsilons, dm.mean, dm.std, pgd_steps=5)
    with torch.no_grad():
        clean = sum(int((network(x).argmax(-1) == y).sum()) for x, y, _ in batches) / 128
    assert clean > 0.5 and accuracy["fgsm"]["0.0"] == accuracy["pgd"]["0.0"] == clean
    fgsm_acc, pgd_acc = list(accuracy["fgsm"].values()), list(accuracy["pgd"].values())
    assert all(a <= clean for a in fgsm_acc + pgd_acc)
    assert all(later <= earlier for earlier, later in zip(fgsm_acc, fgsm_acc[1:]))  # drops as ε grows
    assert fgsm_acc[-1] < clean - 0.2 and pgd_acc[-1] < clean - 0.2


def test_attacks_stay_in_the_eps_ball_and_the_pixel_range(trained_mlp):
    network, batches, dm = trained_mlp
    images, labels, _ = batches[0]
    std, mean = dm.std[0], dm.mean[0]
    for adversarial in (fgsm(network, images, labels, 0.1, dm.mean, dm.std),
                        pgd(network, images, labels, 0.1, dm.mean, dm.std, steps=3)):
        pixels, clean_pixels = adversarial * std + mean, images * std + mean
        assert (pixels - clean_pixels).abs().max() <= 0.1 + 1e-5
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(fgsm(network, images, labels, 0.0, dm.mean, dm.std), images)


# ----------------------------------------------------------------------------- command line
def test_cli_fit_then_budget_and_robustness_of_the_export(tmp_path, teacher_file, capsys):
    fake = ["--data.dataset=fake", "--data.image_size=16", "--data.fake_sizes=[96,48,48]", "--data.batch_size=32"]
    cli = distill_main(["fit", "--model=ResidualKD", "--model.student=resnet8", f"--model.teacher={teacher_file}",
                        "--model.stage_epochs=[1,1]", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *fake])
    results = cli.results
    assert results["method"] == "ResidualKD" and [s["stage"] for s in results["stages"]] == ["student", "student_assistant"]
    on_disk = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    cost = on_disk["stages"][1]["cost"]
    assert cost["S+A"]["flops"] <= cost["given model"]["flops"]  # derived from resnet8 within its budget

    out = tmp_path / "robust.json"
    capsys.readouterr()
    from distill.tools.robustness import main as robustness_main
    report = robustness_main(["--model", results["model_file"], "--dataset", "fake", "--image-size", "16",
                              "--data-kwargs", '{"fake_sizes": [96, 48, 48]}', "--eps", "0", "0.1",
                              "--pgd-steps", "2", "--limit", "20", "--out", str(out)])
    assert json.loads(out.read_text())["accuracy"] == report["accuracy"]
    assert report["accuracy"]["fgsm"]["0.0"] == report["accuracy"]["pgd"]["0.0"]
    assert "| fgsm |" in capsys.readouterr().out


@pytest.mark.slow
def test_mnist5k_config_under_ddp_and_bf16(tmp_path):
    """configs/mnist5k/residual.yaml for one epoch per stage: 2 CPU processes (DDP), then bf16-mixed."""
    teacher = write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    base = [str(Path(sys.executable).with_name("distill")), "fit", "--config", str(REPO / "configs/mnist5k/residual.yaml"),
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--model.init_args.teacher={teacher}", "--model.init_args.stage_epochs=[1,1]", "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_RUN_DIR", None)
    for extra in (["--trainer.devices=2", "--trainer.strategy=ddp"], ["--trainer.precision=bf16-mixed"]):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    for version in ("version_0", "version_1"):
        results = json.loads(Path(f"runs/mnist5k/residual/{version}/results.json").read_text())
        assert [s["stage"] for s in results["stages"]] == ["student", "student_assistant"]
        assert all(0 < s["test_acc"] <= 1 for s in results["stages"])
