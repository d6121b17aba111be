"""PatientConsistentKD (Beyer et al. 2022): on-device augmentation, the four teaching settings, the
fixed teacher's cache, and the optimisation recipe."""

from __future__ import annotations

import json

import copy
import csv
import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.transforms.v2 import functional as TF

from conftest import FAKE, REPO, fake_datamodule, tiny_trainer, write_teacher, in_training_losses
from distill import augment, teacher_cache
from distill.cli import DistillCLI, main, recipe_arguments
from distill.errors import ConfigError
from distill.methods import DistillModule, PatientConsistentKD
from distill.optim import DecoupledAdamW, decay_groups, warmup_cosine
from distill.run import finish_fit, load_results
from distill.teachers import load_network

GEOMETRY = dict(num_classes=10, in_channels=3, image_size=16)


def make(teacher, teaching="function_matching", **kwargs) -> PatientConsistentKD:
    options = dict(student="resnet8", teacher=str(teacher), teaching=teaching, warmup_steps=0, **GEOMETRY)
    return PatientConsistentKD(**{**options, **kwargs})


def batch(n=8, size=16, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- augmentation
def test_inception_boxes_follow_the_official_sampler():
    """big_vision's inception_crop = TF's sample_distorted_bounding_box(area 0.05–1, ratio 0.75–1.33, 100 attempts):
    whole-pixel boxes inside the image, area in range, width = round(height·ratio), heights spread uniformly
    between the extremes of each ratio, offsets uniform, the whole image where nothing fits."""
    assert augment.INCEPTION_SCALE == (0.05, 1.0) and augment.INCEPTION_RATIO == (0.75, 1.33)
    assert inspect.signature(augment.sample_inception_boxes).parameters["attempts"].default == 100
    boxes = augment.sample_inception_boxes(4000, 40, 30, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, boxes.round())  # TF crops whole pixels
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 30).all() and (boxes[:, 3] <= 40).all()
    fallback = (w == 30) & (h == 40)
    area, ratio = (w * h / 1200)[~fallback], (w / h)[~fallback]
    assert fallback.float().mean() < 0.01  # 100 attempts: the whole image almost never
    assert area.min() >= 0.05 and area.max() <= 1.0 and area.min() < 0.06  # 0.08 (torchvision's) would fail
    # width = round(h · r) with r in [0.75, 1.33]: the ratio is in range up to half a pixel of rounding
    assert (ratio >= 0.75 - 0.5 / h[~fallback]).all() and (ratio <= 1.33 + 0.5 / h[~fallback]).all()
    assert ratio.max() > 1.25 and ratio.min() < 0.8
    # offsets uniform integers in 0 … free − 1 (TF's Uniform(free); 0 where the box spans the image)
    for offset, free in [(boxes[~fallback, 0], (30 - w)[~fallback]), (boxes[~fallback, 1], (40 - h)[~fallback])]:
        last = (free - 1).clamp(min=0)
        assert (offset <= last).all() and (offset == last).any() and (offset[free > 0] == 0).any()
        assert abs((offset - last / 2).mean()) < 0.4
    # height uniform between its extremes (not the area): at ratio ~1 on a 100x100 image the heights 23..100
    # (areas 5-100 %) are equally likely, so their mean is ~61 (area-uniform crops would average ~71 px)
    square = augment.sample_inception_boxes(20000, 100, 100, torch.Generator().manual_seed(1), ratio=(1.0, 1.0))
    heights = square[:, 3] - square[:, 1]
    assert heights.min() == 23  # round(sqrt(500)) = 22 is nudged up to 23 (area ≥ 500)
    assert abs(heights.float().mean() - 61.0) < 0.6
    # a range no box can meet: the whole image
    impossible = augment.sample_inception_boxes(50, 40, 30, torch.Generator().manual_seed(0), scale=(0.99, 1.0),
                                                ratio=(3.0, 4.0))
    assert torch.equal(impossible, torch.tensor([[0.0, 0.0, 30.0, 40.0]]).expand(50, 4))
    again = augment.sample_inception_boxes(4000, 40, 30, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def test_crop_resize_matches_a_per_sample_bilinear_crop():
    images = batch(3, 20)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 4.0, 14.0, 16.0], [5.0, 1.0, 15.0, 19.0]])
    out = augment.crop_resize(images, boxes, 12)
    for k, (image, box, crop) in enumerate(zip(images, boxes.int().tolist(), out)):
        x1, y1, x2, y2 = box
        # the official crop: slice, then bilinear at half-pixel centres without anti-aliasing
        reference = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [12, 12], antialias=False)
        # the outermost output pixels of a box inside the image blend in the pixels just outside it
        # instead of clamping at the box edge; everything else is the same computation
        inner = (slice(None), slice(None), slice(None)) if k == 0 else (slice(None), slice(1, -1), slice(1, -1))
        torch.testing.assert_close(crop[inner], reference[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close(augment.crop_resize(images, augment.central_boxes(3, 20, 20), 20), images)
    flips = torch.tensor([True, False, True])
    torch.testing.assert_close(augment.crop_resize(images, boxes, 12, flips), augment.flip(out, flips))


def _grid_sample_crops(images, boxes, size, flips=None):
    """The reference: one affine grid per image and ``grid_sample``, all in float64."""
    batch, channels, height, width = images.shape
    x1, y1, x2, y2 = boxes.double().unbind(1)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = (x2 - x1) / width * (1 - 2 * flips.double() if flips is not None else 1)
    theta[:, 0, 2] = (x1 + x2) / width - 1
    theta[:, 1, 1] = (y2 - y1) / height
    theta[:, 1, 2] = (y1 + y2) / height - 1
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)


# every way crop_resize can run, all of them usable on the CPU
CROP_PATHS = {"dense": augment._crop_resize_dense, "banded": augment._crop_resize_banded,
              "gathered": augment._crop_resize_gathered}


def _crop_with(path, images, boxes, size, flips=None, mix=None):
    height, width = images.shape[-2:]
    boxes = boxes.double()
    rows = augment._source_positions(boxes[:, 1], boxes[:, 3], size, height)
    columns = augment._source_positions(boxes[:, 0], boxes[:, 2], size, width)
    return CROP_PATHS[path](images, rows, columns, size, flips, mix)


@pytest.mark.parametrize("path", list(CROP_PATHS))
@pytest.mark.parametrize("shape", [(6, 160, 160, 128), (5, 28, 28, 28), (4, 20, 30, 12), (4, 24, 40, 29),
                                   (3, 9, 9, 40)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_resize_matches_grid_sample_on_random_boxes(path, shape, dtype):
    n, height, width, size = shape
    generator = torch.Generator().manual_seed(sum(shape))
    images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator)
    if dtype.is_floating_point:
        images = images + torch.rand(images.shape, generator=generator)
    boxes = augment.sample_inception_boxes(n, height, width, generator)
    boxes[0] = torch.tensor([-3.3, -2.0, width + 4.1, height + 1.7])  # past the image: clamped positions
    boxes[1] = torch.tensor([width - 2.5, 0.2, width, 3.1])  # a sliver at the right edge
    flips = augment.sample_flips(n, generator)
    flips[:2] = True
    for mirror in (None, flips):
        reference = _grid_sample_crops(images, boxes, size, mirror)
        crops = _crop_with(path, images, boxes, size, mirror)
        assert crops.dtype == torch.float32
        torch.testing.assert_close(crops.double(), reference, atol=1e-4, rtol=0)
        mixed = _crop_with(path, images, boxes, size, mirror, mix=0.7)
        torch.testing.assert_close(mixed.double(), 0.7 * reference + 0.3 * reference.roll(1, 0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", list(CROP_PATHS))
@pytest.mark.parametrize("size", [16, 80])
def test_crop_resize_of_the_whole_image_at_its_size_is_the_image(path, size):
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = _crop_with(path, images, augment.central_boxes(3, size, size), size)
    assert torch.equal(crops, images.float())


def test_crop_resize_keeps_non_finite_pixels_in_their_image():
    images = batch(4, 160) * 255
    images[0, :, :, 0] = float("inf")
    boxes = torch.tensor([[0.0, 0, 160, 160], [0.2, 0.3, 100.7, 90.1], [-2.0, 0.3, 100.7, 90.1],
                          [0.1, 0.3, 120.7, 162]])  # the last two reach past the image
    crops = augment.crop_resize(images, boxes, 128)
    assert not crops[0].isfinite().all() and crops[1:].isfinite().all()


def test_crop_resize_stays_exact_when_float32_products_may_run_in_bfloat16():
    images = torch.randint(0, 256, (4, 3, 160, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = augment.sample_inception_boxes(4, 160, 160, torch.Generator().manual_seed(1))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        crops = augment.crop_resize(images, boxes, 128)
    finally:
        torch.set_float32_matmul_precision(precision)
    torch.testing.assert_close(crops.double(), _grid_sample_crops(images, boxes, 128), atol=1e-4, rtol=0)


def test_crop_resize_reuses_only_the_memory_of_results_nobody_holds():
    # 32 crops of 128 px are large enough (6 MiB) for crop_resize to reuse an earlier result's memory
    images = torch.randint(0, 256, (32, 3, 160, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = augment.sample_inception_boxes(32, 160, 160, torch.Generator().manual_seed(1))
    first = augment.crop_resize(images, boxes, 128, mix=0.7)
    view = first[1:]  # a view keeps the memory in use
    kept = view.clone()
    del first
    second = augment.crop_resize(images, augment.central_boxes(32, 160, 160), 128, mix=0.7)
    assert torch.equal(view, kept)
    address = second.data_ptr()
    del second
    assert augment.crop_resize(images, boxes, 128, mix=0.7).data_ptr() == address


def test_mixup_coefficient_and_partner():
    generator = torch.Generator().manual_seed(0)
    coefficients = [augment.sample_mixup(generator) for _ in range(2000)]
    assert min(coefficients) >= 0.5 and max(coefficients) <= 1.0
    assert abs(sum(coefficients) / len(coefficients) - 0.75) < 0.02  # max(U, 1−U) ~ U[0.5, 1]
    images = batch(5)
    mixed, a = augment.mixup(images, generator, alpha=0.4)
    assert 0.5 <= a <= 1.0
    torch.testing.assert_close(mixed[1], a * images[1] + (1 - a) * images[0])
    torch.testing.assert_close(mixed[0], a * images[0] + (1 - a) * images[4])


# ----------------------------------------------------------------------------------- teaching settings
def _inputs_seen(model: PatientConsistentKD, teaching_batches: int = 1) -> tuple[list, list]:
    """Runs real training steps and records the tensors that student and teacher were called with."""
    seen_student, seen_teacher = [], []
    model.student.register_forward_pre_hook(lambda m, args: seen_student.append(args[0].detach().clone())
                                            if m.training else None)
    model.teacher.register_forward_pre_hook(lambda m, args: seen_teacher.append(args[0].detach().clone())
                                            if model.trainer.training else None)
    trainer = tiny_trainer("runs", max_epochs=1, limit_train_batches=teaching_batches, limit_val_batches=0)
    trainer.fit(model, datamodule=fake_datamodule(augment="none"))
    return seen_student, seen_teacher


@pytest.mark.parametrize("teaching", ["consistent", "function_matching"])
def test_teacher_and_student_receive_identical_tensors(teacher_file, teaching):
    student, teacher = _inputs_seen(make(teacher_file, teaching))
    assert len(student) == len(teacher) == 1
    assert torch.equal(student[0], teacher[0])


def test_function_matching_feeds_the_same_mixture_at_the_teachers_resolution(teacher_file):
    model = make(teacher_file, "function_matching", teacher_image_size=24)
    images = batch(6, 20)
    views = model.make_views(images, augment.batch_generator(1, 2))
    generator = augment.batch_generator(1, 2)  # the same draws, replayed
    boxes = augment.sample_inception_boxes(6, 20, 20, generator)
    flips = augment.sample_flips(6, generator)
    a = augment.sample_mixup(generator)
    assert views.mixup == a and 0.5 <= a <= 1
    torch.testing.assert_close(views.student, augment.mix(augment.crop_resize(images, boxes, 16, flips), a))
    torch.testing.assert_close(views.teacher, augment.mix(augment.crop_resize(images, boxes, 24, flips), a))


def test_independent_views_differ(teacher_file):
    student, teacher = _inputs_seen(make(teacher_file, "independent"))
    assert student[0].shape == teacher[0].shape and not torch.allclose(student[0], teacher[0])
    views = make(teacher_file, "consistent").make_views(batch(), augment.batch_generator(0))
    assert torch.equal(views.student, views.teacher) and views.mixup is None


def test_draws_depend_on_seed_epoch_batch_and_rank():
    draws = {keys: augment.sample_inception_boxes(4, 16, 16, augment.batch_generator(*keys))
             for keys in [(0, 0, 0, 0), (0, 0, 1, 0), (0, 1, 0, 0), (0, 0, 0, 1), (1, 0, 0, 0)]}
    values = list(draws.values())
    assert all(not torch.equal(values[0], other) for other in values[1:])
    assert torch.equal(values[0], augment.sample_inception_boxes(4, 16, 16, augment.batch_generator(0, 0, 0, 0)))


def test_batch_generator_is_numpys_seed_sequence_of_the_keys():
    """The streams are SeedSequence's of the keys, whatever path the keys take into it (small keys
    go in as an array of 32-bit words, large ones as Python ints)."""
    import numpy as np

    for keys in [(0, 0, 0, 0), (7, 3, 17, 1), (2**32 - 1, 2**32, 5, 0), (2**40 + 5, 1, 2, 3), (-1, 2)]:
        words = np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(2, np.uint32)
        assert augment.batch_generator(*keys).initial_seed() == int(words[0]) << 32 | int(words[1]), keys


# ----------------------------------------------------------------------------------- fixed teacher
def _count_teacher_calls(model: PatientConsistentKD) -> dict:
    calls, stepping = {"build": 0, "train": 0}, in_training_losses(model)
    model.teacher.register_forward_pre_hook(
        lambda m, args: calls.__setitem__("train" if stepping[0] else "build", calls["train" if stepping[0] else "build"] + 1))
    return calls


def _fit_fixed(model, **kwargs):
    trainer = tiny_trainer("runs", max_epochs=1, limit_val_batches=0, **kwargs)
    trainer.fit(model, datamodule=fake_datamodule(augment="none"))
    return trainer


def test_fixed_teacher_is_cached_and_never_runs_in_training(teacher_file, tmp_path):
    first = make(teacher_file, "fixed")
    calls = _count_teacher_calls(first)
    _fit_fixed(first)
    assert calls == {"build": 3, "train": 0}  # 96 training images, eval batches of 32
    path = first.cache_path
    assert path.is_file() and path.parent == tmp_path / "teacher_cache"  # <default_root_dir>/teacher_cache
    # the cache holds the teacher's outputs on the evaluation view of every training image, by index
    data = fake_datamodule(augment="none")
    images, _, indices = next(iter(data.eval_dataloader("train")))
    first.teacher.eval()
    torch.testing.assert_close(first.cached_logits[indices], first.teacher(images), atol=1e-5, rtol=1e-5)

    second = make(teacher_file, "fixed")
    calls = _count_teacher_calls(second)
    before = path.stat().st_mtime_ns
    _fit_fixed(second)
    assert calls == {"build": 0, "train": 0} and path.stat().st_mtime_ns == before


def test_changed_teacher_invalidates_the_cache(teacher_file, tmp_path):
    model = make(teacher_file, "fixed")
    _fit_fixed(model)
    other = write_teacher(tmp_path / "other.safetensors", seed=1)
    changed = make(other, "fixed")
    calls = _count_teacher_calls(changed)
    _fit_fixed(changed)
    assert calls["build"] == 3 and changed.cache_path != model.cache_path
    assert not torch.allclose(changed.cached_logits, model.cached_logits)
    # a stale file where this key's cache should be (here: the first teacher's) is detected and rebuilt
    changed.cache_path.write_bytes(model.cache_path.read_bytes())
    again = make(other, "fixed")
    calls = _count_teacher_calls(again)
    _fit_fixed(again)
    assert calls["build"] == 3
    torch.testing.assert_close(again.cached_logits, changed.cached_logits)
    # so is a truncated (partial) one
    again.cache_path.write_bytes(again.cache_path.read_bytes()[:200])
    last = make(other, "fixed")
    calls = _count_teacher_calls(last)
    _fit_fixed(last)
    assert calls["build"] == 3


def test_a_pinned_stale_cache_is_an_error_and_kept(teacher_file, tmp_path):
    pinned = tmp_path / "mine.safetensors"
    _fit_fixed(make(teacher_file, "fixed", teacher_cache=str(pinned)))
    content = pinned.read_bytes()
    other = write_teacher(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ConfigError, match="other teacher"):
        _fit_fixed(make(other, "fixed", teacher_cache=str(pinned)))
    assert pinned.read_bytes() == content


def _rewrite_cache(path, change):
    """The cache file with its logits changed by ``change`` and its header (key, checksum) kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"logits": change(load_file(str(path))["logits"]).contiguous()}, str(path), metadata=metadata)


def test_a_cache_whose_contents_were_changed_is_rebuilt_and_a_pinned_one_refused(teacher_file, tmp_path):
    """Rows permuted or not finite under an intact header: the checksum written with the logits catches it."""
    model = make(teacher_file, "fixed")
    _fit_fixed(model)
    path, good = model.cache_path, model.cached_logits.cpu().clone()
    for change, why in ((lambda x: x.flip(0), "its contents differ from the checksum"),
                        (lambda x: torch.where(torch.arange(len(x))[:, None] == 3, float("nan"), x), "differ")):
        _rewrite_cache(path, change)
        logits, reason = teacher_cache.read(path, teacher_cache.CacheKey(**json.loads(_metadata(path)["key"])), len(good))
        assert logits is None and reason.startswith("damaged") and why in reason
        again = make(teacher_file, "fixed")
        calls = _count_teacher_calls(again)
        _fit_fixed(again)
        assert calls["build"] == 3  # rebuilt, not used
        torch.testing.assert_close(again.cached_logits.cpu(), good)
    pinned = tmp_path / "mine.safetensors"
    _fit_fixed(make(teacher_file, "fixed", teacher_cache=str(pinned)))
    _rewrite_cache(pinned, lambda x: x.flip(0))
    content = pinned.read_bytes()
    with pytest.raises(ConfigError, match=f"teacher cache {pinned} cannot be used for this run \\(damaged"):
        _fit_fixed(make(teacher_file, "fixed", teacher_cache=str(pinned)))
    assert pinned.read_bytes() == content  # refused, not overwritten


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_a_cache_with_a_consistent_checksum_but_non_finite_rows_is_damaged(tmp_path):
    key = teacher_cache.CacheKey("t", "v", "d")
    logits = torch.randn(4, 3)
    logits[2, 1] = float("inf")
    path = teacher_cache.write(tmp_path / "c.safetensors", key, logits)
    assert teacher_cache.read(path, key, 4) == (None, "damaged: 1 rows are not finite")
    assert teacher_cache.read(teacher_cache.write(path, key, torch.randn(4, 3)), key, 4)[1] == "ok"


def test_cache_key_covers_the_data(teacher_file):
    labels = torch.arange(10).numpy()
    one = teacher_cache.data_fingerprint("fake", "train", labels)
    assert one != teacher_cache.data_fingerprint("fake", "train", labels[::-1].copy())
    assert one != teacher_cache.data_fingerprint("mnist5k", "train", labels)
    key = teacher_cache.CacheKey("t", "v", one)
    other = teacher_cache.CacheKey("t", "v", teacher_cache.data_fingerprint("fake", "train", labels[:9]))
    assert key.digest() != other.digest() and key.differences(other) == ["data"]


# ----------------------------------------------------------------------------------- recipe
def test_warmup_cosine_schedule():
    factor = warmup_cosine(10, 110)
    assert factor(0) == 0 and factor(5) == 0.5 and factor(10) == 1.0
    assert math.isclose(factor(60), 0.5) and math.isclose(factor(110), 0.0, abs_tol=1e-12)


def test_weight_decay_skips_norms_and_biases_and_is_not_multiplied_by_lr(teacher_file):
    model = make(teacher_file, "consistent", lr=0.01, weight_decay=1e-3)
    trainer = tiny_trainer("runs", max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=fake_datamodule(augment="none"))
    weights, rest = trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in model.student.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.dim() >= 2 for p in weights["params"])
    rest_names = [names[id(p)] for p in rest["params"]]
    assert any("bn" in n for n in rest_names) and any(n.endswith("bias") for n in rest_names)
    assert all(p.dim() == 1 for p in rest["params"]) and rest["weight_decay"] == 0
    assert math.isclose(weights["weight_decay"], 1e-3 / 0.01)
    assert len(weights["params"]) + len(rest["params"]) == len(list(model.student.parameters()))
    norm = torch.nn.GroupNorm(2, 4)
    assert decay_groups(norm.parameters()) == ([], list(norm.parameters()))
    # big_vision's decay: a weight without gradient shrinks by sched·wd per step, whatever lr is
    for lr in (0.1, 0.001):
        theta = torch.nn.Parameter(torch.ones(3, 3))
        optimizer = DecoupledAdamW([theta], lr=lr, weight_decay=1e-3)
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.25)  # schedule factor 0.25
        theta.grad = torch.zeros(3, 3)
        optimizer.step()
        torch.testing.assert_close(theta.detach(), torch.full((3, 3), 1 - 0.25 * 1e-3))


def test_gradient_clipping_caps_the_global_norm(teacher_file):
    norms = {}

    class Recorder(PatientConsistentKD):
        def training_losses(self, batch):
            logits, losses = super().training_losses(batch)
            return logits, {"loss": losses["loss"] * 1e4}  # gradients far above norm 1

        def on_before_optimizer_step(self, optimizer):
            norms["before"] = _global_norm(self.student)

        def on_train_start(self):
            super().on_train_start()
            # Adam leaves .grad alone, so after the step the gradients are those Lightning clipped
            self.trainer.optimizers[0].register_step_post_hook(
                lambda *_: norms.__setitem__("after", _global_norm(self.student)))

    model = Recorder(student="resnet8", teacher=str(teacher_file), teaching="consistent", warmup_steps=0, **GEOMETRY)
    trainer = tiny_trainer("runs", max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=fake_datamodule(augment="none"))
    assert norms["before"] > 10 and norms["after"] <= 1.0 + 1e-4


def _global_norm(module):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))


def test_teacher_ensemble_averages_logits(teacher_file, tmp_path):
    other = write_teacher(tmp_path / "other.safetensors", seed=1)
    model = PatientConsistentKD(student="resnet8", teacher=[str(teacher_file), str(other)], **GEOMETRY)
    single = [PatientConsistentKD(student="resnet8", teacher=str(p), **GEOMETRY) for p in (teacher_file, other)]
    images = batch(4)
    expected = (single[0].teacher_logits(images) + single[1].teacher_logits(images)) / 2
    torch.testing.assert_close(model.teacher_logits(images), expected)
    assert len(model.teacher_info["members"]) == 2 and model.teacher_info["sha256"]


def test_bad_settings_are_config_errors(teacher_file):
    with pytest.raises(ConfigError, match="teaching"):
        make(teacher_file, "functional_matching")
    with pytest.raises(ConfigError, match="only used by teaching: fixed"):
        make(teacher_file, "consistent", teacher_cache="x.safetensors")
    with pytest.raises(ConfigError, match="crop_scale"):
        make(teacher_file, crop_scale=[0.5, 0.1])
    with pytest.raises(ConfigError, match="augment: none"):
        fake_datamodule(augment="cifar", train_image_size=24)
    with pytest.raises(ConfigError, match="set data.augment to none"):
        tiny_trainer("runs", max_epochs=1).fit(make(teacher_file), datamodule=fake_datamodule(augment="cifar"))
    with pytest.raises(ConfigError, match="warmup_steps"):
        trainer = tiny_trainer("runs", max_epochs=1, limit_train_batches=2, limit_val_batches=0)
        trainer.fit(make(teacher_file, warmup_steps=50), datamodule=fake_datamodule(augment="none"))


def test_train_image_size_delivers_larger_training_images():
    data = fake_datamodule(augment="none", train_image_size=24)
    assert next(iter(data.train_dataloader()))[0].shape[-1] == 24
    assert next(iter(data.val_dataloader()))[0].shape[-1] == 16
    assert next(iter(data.eval_dataloader("train", view="train")))[0].shape[-1] == 24


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("teaching", ["fixed", "independent", "consistent", "function_matching"])
def test_cli_runs_each_setting(teacher_file, tmp_path, teaching):
    fake = [f"--data.{k}={v}" for k, v in FAKE.items() if k != "fake_sizes"]
    cli = main(["fit", "--model", "PatientConsistentKD", "--model.student", "mlp_30_30",
                "--model.teacher", str(teacher_file), "--model.teaching", teaching, "--model.warmup_steps", "2",
                "--model.teacher_image_size", "16", "--data.augment", "none", "--data.train_image_size", "20",
                *fake, "--data.fake_sizes", "[64, 32, 32]", "--trainer.max_epochs", "2",
                "--trainer.check_val_every_n_epoch", "2", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false"])
    results = load_results(cli.results["run_dir"])
    assert results["method"] == "PatientConsistentKD" and results["epochs"] == 2
    assert 0 <= results["test_acc"] <= 1 and results["test"]["test/agreement"] is not None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(results["run_dir"], size_guidance={"images": 0}).Reload()
    expected = {"inputs/student"} if teaching == "fixed" else {"inputs/student", "inputs/teacher"}
    assert set(events.Tags()["images"]) == expected


PAPER_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "patient" in p.parts and p.name != "recipe.yaml")


def test_paper_configs_exist_for_every_table():
    datasets = {p.parts[-3] for p in PAPER_CONFIGS}
    assert datasets == {"flowers102", "oxford_pets", "food101", "sun397", "imagenet"}
    from test_cli_recipe import resolved_config

    for config in PAPER_CONFIGS:
        text = resolved_config(config)  # the row over its recipe, the method's defaults filled in
        data, init = text["data"]["init_args"], text["model"]["init_args"]
        assert data["augment"] == "none" and data["train_image_size"] > data["image_size"], config
        assert data["persistent_workers"] and text["trainer"]["check_val_every_n_epoch"] > 1, config
        assert init["grad_clip_norm"] == 1.0 and init["teaching"] in ("fixed", "consistent", "function_matching")
        assert isinstance(init["weight_decay"], float) and init["warmup_steps"] in (1500, 5000), config


def _one_per_data_set(config):
    # instantiating a config costs seconds: one per data set in the default suite, the rest marked slow
    keep = config.stem in ("function_matching_fast", "function_matching")
    return pytest.param(config, id="/".join(config.parts[-3:]), marks=() if keep else pytest.mark.slow)


@pytest.mark.parametrize("config", [_one_per_data_set(c) for c in PAPER_CONFIGS])
def test_paper_configs_instantiate(config, tmp_path):
    """Each paper config with fake data and small stand-ins for the BiT networks; the rest as written."""
    from test_cli_recipe import resolved_config

    text = resolved_config(config)  # the row over its recipe, the method's defaults filled in
    teacher = write_teacher(tmp_path / "teacher.safetensors", model="resnet8", image_size=32)
    cli = DistillCLI(args=[*recipe_arguments(["--config", str(config)]), "--data.dataset", "fake", "--data.image_size", "32",
                           "--data.train_image_size", "40", "--data.num_workers", "0",
                           "--model.init_args.student", "resnet8", "--model.init_args.teacher", str(teacher),
                           "--model.init_args.teacher_model", "resnet8", "--model.init_args.teacher_image_size",
                           "32"], run=False)
    expected = text["model"]["init_args"]
    assert isinstance(cli.model, PatientConsistentKD)
    for key in ("teaching", "temperature", "lr", "weight_decay", "warmup_steps", "grad_clip_norm"):
        assert cli.model.hparams[key] == expected[key], key
    # the teacher file (.safetensors) records its network, BiT-M-R152x2
    assert expected["student"] == "timm.resnetv2_50x1_bit" and "bit_m_r152x2" in expected["teacher"]
    assert cli.trainer.max_epochs == text["trainer"]["max_epochs"]
    assert cli.trainer.check_val_every_n_epoch == text["trainer"]["check_val_every_n_epoch"]
    data = text["data"]["init_args"]
    assert data["augment"] == "none" and data["train_image_size"] > data["image_size"]
    assert cli.model.configure_optimizers() is not None


# ----------------------------------------------------------------------------------- end of schedule, teacher resolution
def _accuracy_and_loss(student, datamodule):
    """Top-1 accuracy and mean cross-entropy of ``student`` over the test loader, computed here."""
    datamodule.setup("test")
    student.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for images, labels, _ in datamodule.test_dataloader():
            logits = student(images).float()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
    return correct / count, loss / count


def _student_from_checkpoint(model, path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    student = copy.deepcopy(model.student)
    student.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    return student


def test_results_report_the_end_of_the_schedule_next_to_the_best_checkpoint(teacher_file):
    """results.json: the top level is the best-validation checkpoint (here the first epoch's, by construction),
    ``end_of_schedule`` the weights the fit ended with; each equals an evaluation of those weights made here."""
    torch.manual_seed(0)
    model = make(teacher_file, "consistent", lr=0.01)
    assert model.report_end_of_schedule and not DistillModule.report_end_of_schedule  # opt-in per method
    data = fake_datamodule(augment="none")
    first_epoch_is_best = ModelCheckpoint(monitor="epoch", mode="min", save_top_k=1)  # the best epoch is not the last
    trainer = tiny_trainer("runs", max_epochs=3, callbacks=[first_epoch_is_best])
    trainer.fit(model, datamodule=data)
    last_val_acc = trainer.callback_metrics["val/acc"].item()
    final = copy.deepcopy(model.student)  # the weights the fit ended with
    best_path = first_epoch_is_best.best_model_path
    assert best_path.endswith("epoch=0-step=3.ckpt")
    best = _student_from_checkpoint(model, best_path)
    final_acc, final_loss = _accuracy_and_loss(final, data)
    best_acc, best_loss = _accuracy_and_loss(best, data)
    assert abs(final_loss - best_loss) > 1e-3  # two different networks: exchanging them fails below

    results = finish_fit(trainer, model, data)
    assert results == load_results(results["run_dir"]) | {"config": results["config"]}
    end = results["end_of_schedule"]
    assert (end["epoch"], end["global_step"]) == (3, 9) == (results["epochs"], results["global_steps"])
    assert end["val_acc"] == pytest.approx(last_val_acc)  # the last validation ran on the final weights
    assert end["test_acc"] == pytest.approx(final_acc) and end["test"]["test/acc"] == end["test_acc"]
    assert end["test"]["test/loss"] == pytest.approx(final_loss, rel=1e-5)
    assert results["test_acc"] == pytest.approx(best_acc)
    assert results["test"]["test/loss"] == pytest.approx(best_loss, rel=1e-5)
    assert results["best_checkpoint"] == best_path and set(end["test"]) == set(results["test"])
    # the export is the best-validation network
    exported = load_network(results["model_file"], None, **GEOMETRY).network.state_dict()
    for key, value in best.state_dict().items():
        torch.testing.assert_close(exported[key], value, msg=key)
    # metrics.csv: one row of each test, under its own names
    with open(f"{results['run_dir']}/metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for column, expected in (("test/acc", results["test_acc"]), ("end_of_schedule/test/acc", end["test_acc"])):
        logged = [float(row[column]) for row in rows if row.get(column)]
        assert logged == [pytest.approx(expected)], column

    # validation every second epoch of three: the last one saw epoch 2's weights, not the final ones
    torch.manual_seed(0)
    model = make(teacher_file, "consistent", lr=0.01)
    trainer = tiny_trainer("runs", max_epochs=3, check_val_every_n_epoch=2)
    trainer.fit(model, datamodule=data)
    final_acc, final_loss = _accuracy_and_loss(copy.deepcopy(model.student), data)
    results = finish_fit(trainer, model, data)
    end = results["end_of_schedule"]
    assert end["val_acc"] is None and end["epoch"] == 3 and results["best_checkpoint"].endswith("best-epoch001.ckpt")
    assert end["test"]["test/loss"] == pytest.approx(final_loss, rel=1e-5) and end["test_acc"] == pytest.approx(final_acc)
    assert results["test"]["test/loss"] != pytest.approx(final_loss, rel=1e-5)


@pytest.mark.parametrize("train_image_size, warned", [(20, True), (None, True), (24, False), (32, False)])
def test_teacher_crops_upsampled_from_small_training_images_warn_once(teacher_file, train_image_size, warned):
    model = make(teacher_file, "consistent", teacher_image_size=24)
    trainer = tiny_trainer("runs", max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=fake_datamodule(augment="none", train_image_size=train_image_size))
    upsampled = [str(w.message) for w in caught if w.category is UserWarning and "will be upsampled" in str(w.message)]
    assert len(upsampled) == (1 if warned else 0), upsampled  # once per fit, not per step or epoch
    if warned:
        assert f"from {train_image_size or 16}-px training images" in upsampled[0]
        assert "set data.train_image_size >= 24" in upsampled[0]


def test_end_of_schedule_test_loads_no_hpc_checkpoint_under_slurm(teacher_file, tmp_path, monkeypatch):
    """Under SLURM Lightning's test(ckpt_path=None) would load an auto-requeue's hpc_ckpt_N.ckpt from
    default_root_dir; the final weights are tested all the same (through a checkpoint of their own)."""
    torch.manual_seed(0)
    model = make(teacher_file, "consistent", lr=0.01)
    data = fake_datamodule(augment="none")
    trainer = tiny_trainer("runs", max_epochs=2, check_val_every_n_epoch=2)
    trainer.fit(model, datamodule=data)
    _, final_loss = _accuracy_and_loss(copy.deepcopy(model.student), data)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"an earlier segment's weights")  # unreadable if loaded
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    results = finish_fit(trainer, model, data)
    assert results["end_of_schedule"]["test"]["test/loss"] == pytest.approx(final_loss, rel=1e-5)
    assert not list(tmp_path.rglob("end_of_schedule.ckpt"))  # the temporary checkpoint is gone


def test_a_cache_file_gets_the_permissions_of_any_new_file(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = teacher_cache.write(tmp_path / "c.safetensors", teacher_cache.CacheKey("t", "v", "d"), torch.zeros(2, 2))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not the safetensors writer's 0o600
