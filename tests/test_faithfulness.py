"""Golden tests of the four methods: what each one computes in its training steps, checked against the papers.

Every test trains a method for a few real steps (small networks with BatchNorm, generated data) and, at
each step, recomputes what the paper says the step should compute, independently and in float64:
the loss part by part from the paper's formula (written out here, never through ``distill.losses`` or a
method's helpers), from float64 copies of the networks that should be involved, in the modes they
should be in (the learning network in train mode, every teaching network in eval mode). So a loss with
an exchanged or dropped factor, a stage taught by the wrong network, a teacher whose BatchNorm runs on
batch statistics, or a label term where the paper has none makes the method's own value differ.

Around that: every teaching network (teacher, earlier assistants, ResidualKD's frozen S) is
bit-identical, BatchNorm buffers included, after the fit and gets no gradient; staged methods start
every stage with a fresh optimiser and schedule; PatientConsistentKD's student and teacher receive
exactly the crops, flips and mixtures of an independent resampling (``grid_sample``) of the batch.

Conventions (docs/methods.md): ``α`` weighs the soft term, ``τ²·KL(p_t^τ ‖ p_s^τ)`` summed over classes
and averaged over the batch; ResidualKD's ``‖·‖²`` sums over channels and averages over positions.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from conftest import fake_datamodule, tiny_trainer
from distill import augment
from distill.methods import BaselineKD, PatientConsistentKD, ResidualKD, TeacherAssistantKD, TrainingBatch

DATA = dict(num_classes=10, in_channels=3, image_size=16)
BASE_LR, DECAY = 0.1, 0.5  # the staged tests' recipe: SGD at 0.1, halved every epoch of a stage


# ----------------------------------------------------------------------------------- the papers' formulas
def log_softmax64(logits: Tensor, tau: float = 1.0) -> Tensor:
    scaled = logits.double() / tau
    return scaled - scaled.logsumexp(dim=1, keepdim=True)


def soft_term(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """Hinton's soft term ``τ²·Σ_c p_t^τ (log p_t^τ − log p_s^τ)``, batch mean."""
    log_p_s, log_p_t = log_softmax64(student, tau), log_softmax64(teacher, tau)
    return tau**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def hard_term(student: Tensor, labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy at τ = 1 with label smoothing ε: ``(1−ε)·(−log p_y) + ε·mean_c(−log p_c)``, batch mean."""
    log_p = log_softmax64(student)
    picked = -log_p[torch.arange(len(labels)), labels]
    return ((1 - smoothing) * picked - smoothing * log_p.mean(dim=1)).mean()


def squared_distance(feature: Tensor, target: Tensor) -> Tensor:
    """ResidualKD's ``‖f − g‖²``: summed over channels, averaged over positions and the batch."""
    return (feature.double() - target.double()).pow(2).sum(dim=1).mean()


# ----------------------------------------------------------------------------------- helpers
def float64_copy(network: nn.Module, training: bool) -> nn.Module:
    """An independent float64 copy of ``network`` in the given mode, without the test's hooks (the original
    is left alone)."""
    duplicate = copy.deepcopy(network).double().train(training)
    for module in duplicate.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    return duplicate


def snapshot(network: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def assert_bit_identical(network: nn.Module, before: dict[str, Tensor], what: str) -> None:
    state = network.state_dict()
    assert any("running_mean" in k for k in state), f"{what} has no BatchNorm: the test would not see its buffers"
    for key, value in before.items():
        assert torch.equal(state[key], value), f"{what}: {key} changed"


def assert_no_gradient(network: nn.Module, what: str) -> None:
    for name, p in network.named_parameters():
        assert not p.requires_grad and p.grad is None, f"{what}: {name} has a gradient"


def assert_parts(record: dict[str, Any]) -> None:
    """The method's loss parts equal the independent ones (same names, float64 tolerance of float32 work)."""
    got, expected = record["losses"], record["expected"]
    assert set(expected) <= set(got), (sorted(got), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"step {record['step']} {name}: {m}")


def record_steps(model: nn.Module, expect: Callable[[TrainingBatch], dict[str, Any]],
                 labels_given: Callable[[Tensor], Tensor] | None = None) -> list[dict[str, Any]]:
    """Wraps ``model.training_losses``: before each training step's own computation, ``expect(batch)``
    records what the step should compute; afterwards the method's loss parts are added. ``labels_given``
    replaces the labels the method receives (to show a loss does not use them)."""
    records: list[dict[str, Any]] = []
    original = model.training_losses

    def wrapped(batch: TrainingBatch):
        record = {"epoch": model.current_epoch, "step": model.global_step, **expect(batch)}
        if labels_given:
            batch = dataclasses.replace(batch, labels=labels_given(batch.labels))
        logits, losses = original(batch)
        record["losses"] = {k: v.detach().double() for k, v in losses.items()}
        records.append(record)
        return logits, losses

    model.training_losses = wrapped
    return records


def optimiser_state(model: nn.Module) -> dict[str, Any]:
    optimizer = model.trainer.optimizers[0]
    # the optimiser object itself, not its id(): a freed stage's id can be reused by the next stage's optimiser
    return {"lr": optimizer.param_groups[0]["lr"], "optimizer": optimizer, "fresh": not optimizer.state,
            "optimised": {id(p) for group in optimizer.param_groups for p in group["params"]}}


def sgd(params):
    return torch.optim.SGD(params, lr=BASE_LR, momentum=0.9)


def halving(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=DECAY)


def assert_stages_restart(records: list[dict[str, Any]], stage_starts: dict[Any, int]) -> None:
    """Every stage: a new optimiser with no state at its first step, the schedule counted from the stage's start."""
    seen: dict[Any, int] = {}
    for record in records:
        stage = record["stage"]
        first = stage not in seen
        if first:
            assert record["fresh"], f"stage {stage} began with the previous stage's optimiser state"
            assert all(record["optimizer"] is not o for o in seen.values()), f"stage {stage} kept the previous optimiser"
            seen[stage] = record["optimizer"]
        else:
            assert record["optimizer"] is seen[stage]
        expected = BASE_LR * DECAY ** (record["epoch"] - stage_starts[stage])
        assert record["lr"] == pytest.approx(expected, rel=1e-12), (stage, record["epoch"], record["lr"])
    assert len(seen) == len(stage_starts)
    assert not all(r["fresh"] for r in records)  # momentum exists after a stage's first step: the check can fail


class ValidationRecorder(L.Callback):
    """After each validation epoch: the stage, the learning network's accuracy on the validation split
    (computed here, in float64, eval mode) and its weights."""

    def __init__(self, learning: Callable[[], nn.Module], data: Any) -> None:
        self.learning, self.data = learning, data
        self.epochs: list[tuple[int, float, dict[str, Tensor]]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        network = float64_copy(self.learning(), training=False)
        hits = total = 0
        with torch.no_grad():
            for images, labels, _ in self.data.val_dataloader():
                hits += int((network(images.double()).argmax(dim=1) == labels).sum())
                total += len(labels)
        self.epochs.append((pl_module.stage, hits / total, snapshot(self.learning())))


# ----------------------------------------------------------------------------------- BaselineKD
@pytest.mark.parametrize("alpha, tau, smoothing, cache", [(0.3, 2.0, 0.0, False), (0.9, 5.0, 0.1, False),
                                                          (0.6, 3.0, 0.0, True)])
def test_baseline_kd_is_hintons_loss_from_the_frozen_teacher(tmp_path, teacher_file, alpha, tau, smoothing, cache):
    """``(1−α)·CE(y, z_s) + α·τ²·KL(p_t^τ ‖ p_s^τ)`` by parts, the teacher in eval mode and untouched (also
    when its outputs come from the cache)."""
    model = BaselineKD(student="resnet8", teacher=str(teacher_file), temperature=tau, alpha=alpha,
                       label_smoothing=smoothing, cache_teacher_outputs=cache, **DATA)
    teacher, before = float64_copy(model.teacher, training=False), snapshot(model.teacher)

    def expect(batch: TrainingBatch) -> dict[str, Any]:
        images, labels = batch.images, batch.labels
        z_s = float64_copy(model.student, training=True)(images.double())
        z_t = teacher(images.double())
        ce, kd = hard_term(z_s, labels, smoothing), soft_term(z_s, z_t, tau)
        return {"expected": {"loss_ce": ce, "loss_kd": kd, "loss": (1 - alpha) * ce + alpha * kd},
                "teacher_training": model.teacher.training, **optimiser_state(model)}

    records = record_steps(model, expect)
    tiny_trainer(tmp_path, max_epochs=2).fit(model, datamodule=fake_datamodule(augment="none"))

    assert len(records) == 6  # 96 images, batches of 32, 2 epochs
    student = {id(p) for p in model.student.parameters()}
    for record in records:
        assert_parts(record)
        assert not record["teacher_training"] and record["optimised"] == student
    assert_bit_identical(model.teacher, before, "teacher")
    assert_no_gradient(model.teacher, "teacher")


# ----------------------------------------------------------------------------------- TeacherAssistantKD
def test_takd_each_stage_is_kd_from_the_previous_networks_best_weights(tmp_path, teacher_file):
    """teacher → TA₁ → TA₂ → student: stage k's targets are network k−1's eval-mode outputs with stage k's own
    τ and α; every earlier network stays bit-identical and gradient-free, every later one waits in eval
    mode; each stage gets a fresh optimiser and schedule."""
    taus, alphas = [2.0, 4.0, 3.0], [0.3, 0.9, 0.6]
    model = TeacherAssistantKD(student="takd_cnn2", assistants=["takd_cnn6", "takd_cnn4"], stage_epochs=[2, 2, 2],
                               teacher=str(teacher_file), stage_temperature=taus, stage_alpha=alphas,
                               optimizer=sgd, lr_scheduler=halving, **DATA)
    path = [model.teacher, *model.assistants, model.student]
    at_stage_start: dict[int, list[dict[str, Tensor]]] = {}

    def expect(batch: TrainingBatch) -> dict[str, Any]:
        images, labels = batch.images, batch.labels
        k = model.stage
        at_stage_start.setdefault(k, [snapshot(network) for network in path[: k + 1]])
        z_s = float64_copy(path[k + 1], training=True)(images.double())
        z_t = float64_copy(path[k], training=False)(images.double())
        ce, kd = hard_term(z_s, labels), soft_term(z_s, z_t, taus[k])
        return {"stage": k, "modes": [network.training for network in path],
                "expected": {"loss_ce": ce, "loss_kd": kd, "loss": (1 - alphas[k]) * ce + alphas[k] * kd},
                **optimiser_state(model)}

    records = record_steps(model, expect)
    data = fake_datamodule(augment="none")
    validated = ValidationRecorder(lambda: path[model.stage + 1], data)
    tiny_trainer(tmp_path, max_epochs=6, callbacks=[validated]).fit(model, datamodule=data)

    assert [r["stage"] for r in records] == [0] * 6 + [1] * 6 + [2] * 6
    for record in records:
        assert_parts(record)
        k = record["stage"]
        assert record["modes"] == [i == k + 1 for i in range(len(path))], (k, record["modes"])
        assert record["optimised"] == {id(p) for p in path[k + 1].parameters()}
    assert_stages_restart(records, {0: 0, 1: 2, 2: 4})
    # a network that has taught is never touched again; each assistant teaches with its stage's best weights,
    # the ones it exported
    for k, snapshots in at_stage_start.items():
        for i, before in enumerate(snapshots):
            assert_bit_identical(path[i], before, f"network {i} (teaching from stage {k})")
            if i < len(path) - 1:
                assert_no_gradient(path[i], f"network {i}")
    told_apart = 0
    for k in (0, 1):  # the next stage is taught by the weights of this stage's best validation epoch (the first of ties)
        scores = [(accuracy, n) for n, (stage, accuracy, _) in enumerate(validated.epochs) if stage == k]
        best = validated.epochs[max(scores, key=lambda score: (score[0], -score[1]))[1]][2]
        last = validated.epochs[scores[-1][1]][2]
        for key, value in at_stage_start[k + 1][k + 1].items():
            assert torch.equal(value, best[key]), (k, key)
        told_apart += any(not torch.equal(best[key], last[key]) for key in best)
    assert told_apart  # in some stage the best weights are not the last ones, so the check can fail
    run_dir = tmp_path / "run" / "version_0"
    for i, name in [(1, "ta1"), (2, "ta2")]:
        exported = load_file(run_dir / "stages" / f"{name}.safetensors")
        for key, value in at_stage_start[i][i].items():
            assert torch.equal(exported[key], value), (name, key)


# ----------------------------------------------------------------------------------- ResidualKD
def _residual(teacher_file, scheme: str, classifier: str, ce_weight: float, stage_epochs: list[int]) -> ResidualKD:
    return ResidualKD(student="resnet8", student_kwargs={"width": 0.5}, assistant="resnet8",
                      assistant_kwargs={"width": 0.25}, stage_epochs=stage_epochs, teacher=str(teacher_file),
                      scheme=scheme, classifier=classifier, ce_weight=ce_weight, optimizer=sgd,
                      lr_scheduler=halving, **DATA)


@pytest.mark.parametrize("scheme, classifier, ce_weight, stage_epochs", [
    ("m1", "teacher", 1.0, [2, 2]), ("m1", "trained", 0.5, [2, 2]), ("m3", "trained", 2.0, [3]),
    ("m2", "teacher", 1.0, [3, 3]),
])
def test_residual_kd_losses_are_the_papers_feature_distances(tmp_path, teacher_file, scheme, classifier, ce_weight,
                                                             stage_epochs):
    """M.1: stage 1 ``‖c_S(f_S) − f_T‖²``, stage 2 ``‖c_A(f_A) − (f_T − c_S(f_S))‖²`` with S frozen (eval mode,
    bit-identical, no gradient); M.3 both at once, S and A learning; M.2 the same summed over the
    ``1 + ⌊e·K/E⌋`` shallowest blocks in epoch e of a stage of E. The teacher's features are its eval-mode
    ones; a trained classifier adds ``ce_weight·CE`` on the predictor's logits, the teacher's stays frozen."""
    model = _residual(teacher_file, scheme, classifier, ce_weight, stage_epochs)
    pair, teacher = model.student, float64_copy(model.teacher, training=False)
    teacher_before, head_before = snapshot(model.teacher), snapshot(pair.head)
    starts = [sum(stage_epochs[:i]) for i in range(len(stage_epochs))]
    s_at_stage_two: list[dict[str, Tensor]] = []

    def mapped(body: nn.Module, final: nn.Module, blocks: str, training: bool, x: Tensor, count: int) -> list[Tensor]:
        features = float64_copy(body, training).forward_features(x)
        connectors = [float64_copy(c, training) for c in model.block_connectors[blocks]] if scheme == "m2" else []
        inner = [c(f) for c, f in zip(connectors, features[:-1])]
        return (inner + [float64_copy(final, training)(features[-1])])[-count:]

    def expect(batch: TrainingBatch) -> dict[str, Any]:
        images, labels = batch.images, batch.labels
        stage = model.stage_names[model.stage]
        x = images.double()
        t_maps = teacher.forward_features(x)
        blocks = len(t_maps) if scheme == "m2" else 1
        epoch_in_stage, epochs = model.current_epoch - starts[model.stage], stage_epochs[model.stage]
        used = min(blocks, 1 + epoch_in_stage * blocks // epochs) if scheme == "m2" else 1
        t_maps = t_maps[-blocks:]
        s_learns = stage != "assistant"
        if not s_learns and not s_at_stage_two:
            s_at_stage_two.append(snapshot(pair.student) | {f"connector.{k}": v for k, v in
                                                            snapshot(pair.student_connector).items()})
        s_maps = mapped(pair.student, pair.student_connector, "student", s_learns, x, blocks)
        expected: dict[str, Tensor] = {}
        if s_learns:
            expected["loss_student"] = sum(squared_distance(s, t) for s, t in list(zip(s_maps, t_maps))[:used])
        feature = s_maps[-1]
        if stage != "student":
            a_maps = mapped(pair.assistant, pair.assistant_connector, "assistant", True, x, blocks)
            expected["loss_assistant"] = sum(squared_distance(a, t - s)
                                             for a, s, t in list(zip(a_maps, s_maps, t_maps))[:used])
            feature = s_maps[-1] + a_maps[-1]
        if classifier == "trained":
            logits = float64_copy(pair.head, True)(feature)
            expected["loss_ce"] = ce_weight * hard_term(logits, labels)
        expected["loss"] = sum(expected.values())
        return {"stage": stage, "expected": expected, "teacher_training": model.teacher.training,
                "s_training": pair.student.training, "a_training": pair.assistant.training, **optimiser_state(model)}

    records = record_steps(model, expect)
    tiny_trainer(tmp_path, max_epochs=sum(stage_epochs)).fit(model, datamodule=fake_datamodule(augment="none"))

    assert len(records) == 3 * sum(stage_epochs)
    s_params = {id(p) for m in (pair.student, pair.student_connector) for p in m.parameters()}
    a_params = {id(p) for m in (pair.assistant, pair.assistant_connector) for p in m.parameters()}
    for record in records:
        assert_parts(record)
        stage = record["stage"]
        assert not record["teacher_training"]
        assert record["s_training"] == (stage != "assistant") and record["a_training"] == (stage != "student")
        optimised = record["optimised"]
        assert bool(optimised & s_params) == (stage != "assistant") and bool(optimised & a_params) == (stage != "student")
    assert_stages_restart(records, dict(zip(model.stage_names, starts)))
    assert_bit_identical(model.teacher, teacher_before, "teacher")
    assert_no_gradient(model.teacher, "teacher")
    if classifier == "teacher":  # the teacher's classifier, shared and frozen
        for key, value in head_before.items():
            assert torch.equal(pair.head.state_dict()[key], value), key
    if s_at_stage_two:  # M.1/M.2 stage 2: S (and its connector) frozen, BatchNorm statistics included
        after = snapshot(pair.student) | {f"connector.{k}": v for k, v in snapshot(pair.student_connector).items()}
        assert any("running_var" in k for k in after)
        for key, value in s_at_stage_two[0].items():
            assert torch.equal(after[key], value), f"frozen S: {key} changed"
        for p in pair.student.parameters():
            assert not p.requires_grad and p.grad is None


# ----------------------------------------------------------------------------------- PatientConsistentKD
def reference_crops(images: Tensor, boxes: Tensor, size: int, flips: Tensor) -> Tensor:
    """Each box cut out and resized bilinearly at half-pixel centres (TF's resize, no anti-aliasing), source
    positions clamped to the image, then mirrored where ``flips``: ``grid_sample`` in float64, per image."""
    batch, _, height, width = images.shape
    out = []
    for image, (x1, y1, x2, y2), flip in zip(images.double(), boxes.double().tolist(), flips.tolist()):
        centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        xs = (x1 + (x2 - x1) * centres - 0.5).clamp(0, width - 1)
        ys = (y1 + (y2 - y1) * centres - 0.5).clamp(0, height - 1)
        grid = torch.stack(torch.meshgrid((xs + 0.5) / width * 2 - 1, (ys + 0.5) / height * 2 - 1, indexing="xy"), -1)
        crop = F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def reference_mixup(images: Tensor, a: float) -> Tensor:
    """big_vision's mixup: ``a·x_i + (1−a)·x_{i−1}``, the partner being the batch rolled by one."""
    return a * images + (1 - a) * images.roll(1, dims=0)


def draw_boxes(model: PatientConsistentKD, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One draw of crop boxes and flips for the batch, as the method draws them."""
    batch, _, height, width = images.shape
    boxes = augment.sample_inception_boxes(batch, height, width, generator, model.hparams.crop_scale,
                                           model.hparams.crop_ratio)
    return boxes, augment.sample_flips(batch, generator)


def reference_views(model: PatientConsistentKD, images: Tensor, seed: int) -> tuple[Tensor, Tensor | None, float | None]:
    """The student's and the teacher's inputs per the paper's Figure 3, from the step's random draws (replayed
    from its generator in the order the method draws them: boxes, flips, mixup, the second view's boxes, flips)."""
    hp = model.hparams
    generator = torch.Generator().manual_seed(seed)
    size, teacher_size = hp.image_size, hp.teacher_image_size or hp.image_size
    boxes, flips = draw_boxes(model, images, generator)
    if model.teaching == "function_matching":
        a = augment.sample_mixup(generator, hp.mixup_alpha)
        return (reference_mixup(reference_crops(images, boxes, size, flips), a),
                reference_mixup(reference_crops(images, boxes, teacher_size, flips), a), a)
    student = reference_crops(images, boxes, size, flips)
    if model.teaching == "fixed":
        return student, None, None
    if model.teaching == "independent":
        boxes, flips = draw_boxes(model, images, generator)
    return student, reference_crops(images, boxes, teacher_size, flips), None


SETTINGS = [("function_matching", 1.0, None), ("function_matching", 3.0, 24), ("consistent", 3.0, None),
            ("consistent", 1.0, 24), ("independent", 2.0, None), ("independent", 1.0, 24), ("fixed", 3.0, None),
            ("fixed", 1.0, 24)]


@pytest.mark.parametrize("teaching, tau, teacher_size", SETTINGS)
def test_patient_consistent_inputs_and_loss_follow_the_paper(tmp_path, teacher_file, teaching, tau, teacher_size):
    """For each teaching setting: the exact tensors student and teacher receive (function matching: the
    identical mixed crop, the teacher's cut at its own resolution from the same image; consistent: the same
    crop, no mixup; independent: other crops; fixed: the teacher's cached output of the evaluation view),
    and the loss ``τ²·KL(p_t^τ ‖ p_s^τ)`` with no label term: it is the same with shuffled labels."""
    model = PatientConsistentKD(student="resnet8", teacher=str(teacher_file), teaching=teaching, temperature=tau,
                                teacher_image_size=teacher_size, warmup_steps=0, **DATA)
    teacher, before = float64_copy(model.teacher, training=False), snapshot(model.teacher)
    seeds: list[int] = []
    original_generator = model.batch_generator

    def generator_spy(batch_idx: int) -> torch.Generator:
        generator = original_generator(batch_idx)
        seeds.append(generator.initial_seed())
        return generator

    model.batch_generator = generator_spy
    # the inputs the networks receive in training steps (the fixed teacher's cache is built before the first)
    seen: dict[str, list[Tensor]] = {"student": [], "teacher": []}
    stepping = [False]
    model.student.register_forward_pre_hook(
        lambda m, args: seen["student"].append(args[0].detach().clone()) if stepping[0] else None)
    model.teacher.register_forward_pre_hook(
        lambda m, args: seen["teacher"].append(args[0].detach().clone()) if stepping[0] else None)
    data = fake_datamodule(augment="none")
    data.setup("fit")
    eval_view = torch.zeros(96, 3, 16, 16, dtype=torch.float64)  # the fixed teacher's view, by training index
    for images, _, indices in data.eval_dataloader("train"):
        eval_view[indices] = images.double()
    whole = augment.central_boxes(96, 16, 16)

    def expect(batch: TrainingBatch) -> dict[str, Any]:
        images = batch.images
        seed = original_generator(batch.batch_idx).initial_seed()
        student_view, teacher_view, a = reference_views(model, images, seed)
        if teaching == "fixed":  # the teacher's output of the evaluation view, resized to its input size
            indices = batch.indices
            teacher_view = reference_crops(eval_view[indices], whole[indices], teacher_size or 16,
                                           torch.zeros(len(indices), dtype=torch.bool))
        z_s = float64_copy(model.student, training=True)(student_view)
        z_t = teacher(teacher_view)
        stepping[0] = True
        return {"images": images.clone(), "seed": seed, "views": (student_view, teacher_view, a),
                "expected": {"loss": soft_term(z_s, z_t, tau)}, "teacher_training": model.teacher.training}

    # the loss may not depend on the labels: the method gets others than the batch's
    records = record_steps(model, expect, labels_given=lambda labels: (labels.roll(1) * 7 + 3) % 10)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)

    assert len(records) == 2 and seeds == [r["seed"] for r in records]  # the method drew from these generators
    assert len(seen["student"]) == 2
    assert len(seen["teacher"]) == (0 if teaching == "fixed" else 2)  # the fixed teacher never runs in training
    for n, record in enumerate(records):
        student_view, teacher_view, a = record["views"]
        assert seen["student"][n].shape[-1] == 16
        torch.testing.assert_close(seen["student"][n].double(), student_view, rtol=0, atol=1e-5)
        if teaching != "fixed":
            assert seen["teacher"][n].shape[-1] == (teacher_size or 16)
            torch.testing.assert_close(seen["teacher"][n].double(), teacher_view, rtol=0, atol=1e-5)
        boxes, flips = draw_boxes(model, record["images"], torch.Generator().manual_seed(record["seed"]))
        plain_crops = reference_crops(record["images"], boxes, teacher_size or 16, flips)
        if teaching == "function_matching":  # mixed, not plain crops
            assert 0.5 <= a < 1.0 and not torch.allclose(teacher_view, plain_crops, atol=1e-3)
        elif teaching == "consistent":
            assert torch.equal(teacher_view, plain_crops)
        elif teaching == "independent":  # other crops than the student's
            assert not torch.allclose(teacher_view, plain_crops, atol=1e-3)
        assert_parts(record)
        assert set(record["losses"]) == {"loss"}  # a single term: no label loss
        assert not record["teacher_training"]
    assert_bit_identical(model.teacher, before, "teacher")
    assert_no_gradient(model.teacher, "teacher")


def test_patient_consistent_schedule_is_big_visions_warmup_cosine(tmp_path, teacher_file):
    """Learning rate at every step: ``lr·min(1, t/w)·½(1 + cos(π·(t − w)/(T − w)))``, 0 at the first step."""
    model = PatientConsistentKD(student="resnet8", teacher=str(teacher_file), lr=0.01, warmup_steps=2, **DATA)
    rates: list[float] = []
    records = record_steps(model, lambda batch: rates.append(model.trainer.optimizers[0].param_groups[0]["lr"])
                           or {})
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(model, datamodule=fake_datamodule(augment="none"))
    total = 6
    expected = [0.01 * min(1.0, t / 2) * 0.5 * (1 + math.cos(math.pi * min(max((t - 2) / (total - 2), 0.0), 1.0)))
                for t in range(total)]
    assert len(records) == total
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-12)
