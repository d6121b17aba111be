"""The training loop never waits for the device: no host read of a tensor in the steady-state step (issue 20).

On a GPU every ``.item()``, ``bool(tensor)`` or ``.cpu()`` waits for all the work queued before it, so a loop
that reads one value per step can never run ahead of the device. These tests run every method through
``distill fit`` on the CPU with the progress bar on and catch the reads in Python (a GPU run can add
``torch.cuda.set_sync_debug_mode``: ``distill bench-gpu`` counts the synchronisations per step with it). Every method's
step also runs with its networks and batch on the ``meta`` device, where reading any value raises (a data-dependent
operator such as boolean-mask indexing too) and where the copies from host memory can be watched.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from distill import augment
from distill.methods import TrainingBatch
from distill.tools import bench
from distill.tools.device_ops import launches_kernel

from distill.methods import METHODS
from distill.reliability import nonfinite
from distill.tools import killtest
from distill.tools.main import main
from reliability_helpers import NoHostReads, host_reads


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_training_step_reads_a_tensor_on_the_host(method, tmp_path, monkeypatch):
    """Between the reads of the losses (moved out of reach here) no step of any method reads a tensor on the
    host: not the loss check, the epoch means, the step logs, the progress bar's loss or any callback."""
    monkeypatch.setattr(nonfinite, "READ_EVERY", 10**6)
    config = killtest.method_config(method, tmp_path, epochs=2, train_size=128)  # 8 steps an epoch
    config["trainer"].update(enable_progress_bar=True, log_every_n_steps=10**6)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path), "--trainer.callbacks+=reliability_helpers.NoHostReads"])
    (watcher,) = [c for c in cli.trainer.callbacks if isinstance(c, NoHostReads)]
    assert watcher.watched == 2 * 6, watcher.watched  # steps 1..6 of both epochs were watched
    assert watcher.calls == [], watcher.calls


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy from host memory to another device, and whether it waits for the device (a blocking
    copy from host memory synchronises with the stream on CUDA: all the work queued before it must finish)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[bool] = []  # non_blocking of each

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_to_copy" and args[0].device.type == "cpu" and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != "cpu":
            self.copies.append(bool(kwargs.get("non_blocking", False)))
        elif name == "copy_" and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.copies.append(bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("mix", [None, 0.3])
def test_device_crops_copy_their_plan_without_waiting_for_the_device(mix):
    """PatientConsistentKD's crops are planned on the host (the same random stream on every device) and cut on
    the device: the plan goes there in two copies that do not wait for the device's queued work. Images on the
    ``meta`` device stand in for a GPU's here."""
    generator = torch.Generator().manual_seed(0)
    images = torch.empty(4, 3, 32, 32, device="meta")
    boxes = augment.sample_inception_boxes(4, 32, 32, generator)
    flips = augment.sample_flips(4, generator)
    with HostToDeviceCopies() as watch:
        out = augment.crop_resize(images, boxes, 24, flips, mix=mix)
        augment.flip(out, flips)
    assert out.shape == (4, 3, 24, 24) and out.device.type == "meta"
    assert watch.copies == [True, True, True], watch.copies  # the plan's indices and weights; the flip mask


def test_the_copy_watch_sees_blocking_copies():
    with HostToDeviceCopies() as watch:
        torch.ones(3).to("meta")
        torch.empty(3, device="meta").copy_(torch.ones(3), non_blocking=True)
    assert watch.copies == [False, True]


@pytest.mark.parametrize("row", list(bench.ROWS))
def test_every_methods_step_runs_on_a_device_without_host_reads_or_blocking_copies(row, tmp_path, monkeypatch):
    """Every benchmark row's ``training_losses`` and backward pass with networks, cached teacher outputs and batch
    on the ``meta`` device (no data: any host read of a value raises, including those inside operators whose
    output size depends on the data, which synchronise on a GPU and which the patched Tensor methods above cannot
    see) copies nothing from host memory in a way that waits for the device."""
    pair = bench.PAIRS["tiny_mlp"]
    batches = bench.make_batches(pair, 8, 2, torch.device("cpu"))
    module = bench.ROWS[row].build(bench.BenchContext(pair, tmp_path, batches))
    if row == "ResidualKD/student":
        # whether A's zero-initialised connector is still silent is read on the host once per stage (and after a
        # checkpoint load), not per step; its answer here, before the module leaves the CPU
        silent = module._assistant_silent()
        monkeypatch.setattr(type(module), "_assistant_silent", lambda self: silent)
    module.to("meta")
    if getattr(module, "cached_logits", None) is not None:
        module.cached_logits = module.cached_logits.to("meta")
    images, labels, indices = (t.to("meta") for t in batches[0])
    with HostToDeviceCopies() as watch:
        logits, losses = module.training_losses(TrainingBatch(images, labels, indices, 0))
        losses["loss"].backward()
    assert logits.device.type == "meta" and logits.shape == (8, pair.num_classes)
    assert all(watch.copies), watch.copies


class DeviceOperators(TorchDispatchMode):
    """Counts the operators whose output is on a device other than the host and that may launch a kernel there
    (:func:`distill.tools.device_ops.launches_kernel`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and first.device.type != "cpu" and launches_kernel(func):
            self.count += 1
        return out


@pytest.mark.parametrize("mix", [None, 0.3])
def test_device_crops_launch_a_few_kernels_for_the_whole_batch(mix):
    """The crops of a batch on the device run the same few operators there for 4 images as for 64 (none per image):
    python -m pytest tests/test_host_sync.py -k few_kernels gives the figures of docs/performance.md."""
    counts = []
    for batch in (4, 64):
        generator = torch.Generator().manual_seed(0)
        images = torch.empty(batch, 3, 32, 32, device="meta")
        boxes = augment.sample_inception_boxes(batch, 32, 32, generator)
        flips = augment.sample_flips(batch, generator)
        with DeviceOperators() as watch:
            augment.crop_resize(images, boxes, 32, flips, mix=mix)
        counts.append(watch.count)
    assert counts[0] == counts[1] <= 20, counts


def test_evaluation_metrics_update_without_host_reads():
    """Validation and test batches only add to sums on the device: the metrics' updates run on the meta device,
    where a host read raises (torchmetrics' MeanMetric checks each value for NaN on the host, and its accuracy
    validates its inputs there by default)."""
    from distill.methods.evaluation import EvaluationMetrics

    metrics = EvaluationMetrics(10).to("meta")
    logits, teacher = torch.randn(8, 10, device="meta"), torch.randn(8, 10, device="meta")
    for stage in ("val", "test"):
        metrics.update(stage, logits, torch.zeros(8, dtype=torch.long, device="meta"), teacher,
                       lambda *args, **kwargs: None, "")
    assert metrics.val["loss"].total.device.type == "meta"


def test_the_evaluation_mean_is_torchmetrics_mean_without_its_nan_check():
    from torchmetrics import MeanMetric

    from distill.methods.evaluation import Mean

    generator = torch.Generator().manual_seed(0)
    ours, reference = Mean(), MeanMetric()
    for size in (32, 32, 7):  # batch means weighted by batch size, and per-sample values
        for value, weight in ((torch.rand((), generator=generator), size), (torch.rand(size, generator=generator), 1)):
            ours.update(value, weight)
            reference.update(value, weight)
    torch.testing.assert_close(ours.compute(), reference.compute())
    ours.update(torch.tensor([float("nan")]))
    assert torch.isnan(ours.compute())  # shown in the logs, not an exception in the middle of a validation


def test_a_teacher_cache_pass_reads_its_outputs_on_the_host_once():
    """teacher_cache.compute gathers the outputs where they are computed and copies them to the host at the end: a
    copy per batch would make a GPU wait for the host before each of the every-view cache's thousands of batches."""
    from distill import teacher_cache

    batches = [(torch.randn(4, 3), torch.zeros(4), torch.arange(4 * k, 4 * k + 4)) for k in range(5)]
    with host_reads() as calls:
        logits = teacher_cache.compute(batches, lambda images: images * 2, 20)
    reads = sorted(method for _, method, _ in calls)
    assert reads == ["__bool__", "cpu"], calls  # the completeness check and the one copy, after the loop
    torch.testing.assert_close(logits, torch.cat([images for images, _, _ in batches]) * 2)
