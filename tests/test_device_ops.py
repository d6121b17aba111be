"""Operators per training step: the count itself, and that our training step adds almost none to a method's own.

On a GPU at the recipes' batch sizes every operator is a kernel launch the step waits for, so per-step device work
around ``training_losses`` (metrics, logging, checks) costs speed whatever its size. Counts are exact and the same on
every machine, so a budget on them can be asserted where timings cannot.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

from distill.methods.epoch_means import EpochMeans
from distill.reliability import nonfinite
from distill.tools import bench
from distill.tools.device_ops import OperatorCount, count_per_step, foreach_as_on_cuda

#: What DistillModule.training_step adds to each step of the method's own ``training_losses``, backward and optimiser
#: step run by the same Trainer: the training accuracy (argmax, eq). Nothing else, except on the few steps that
#: read the loss parts on the host (every 16 steps: the non-finite check), that the loggers write (every
#: ``log_every_n_steps``, 50 by default: also a read) and that fold the epoch means (every 64 steps).
ACCURACY_OPERATORS = 2
#: steps counted: a multiple of the read interval (16) and of the epoch means' fold (64)
COUNTED_STEPS = 64
#: the most steps of a 64-step window that may do more: its reads, its logger writes, its fold
PERIODIC_STEPS = (COUNTED_STEPS // nonfinite.READ_EVERY + math.ceil(COUNTED_STEPS / 50)
                  + COUNTED_STEPS // EpochMeans.fold_every)


def test_operator_count_counts_kernels_not_views_or_allocations():
    a, b = torch.ones(3, 4), torch.ones(3, 4)
    with OperatorCount() as count:
        c = a + b               # add
        d = c.view(-1).t()      # views: not counted
        e = (d * 2).sum()       # mul, sum
        f = a.detach()          # a view
        torch.relu_(f)          # relu_
        torch.empty(5)          # an allocation: no kernel
        del e
    assert dict(count.counts) == {"add": 1, "mul": 1, "sum": 1, "relu_": 1} and count.total == 4


def test_backward_and_optimiser_operators_are_counted():
    weight = torch.nn.Parameter(torch.ones(4, 2))
    optimizer = torch.optim.SGD([weight], lr=0.1, foreach=False)

    def step(k: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        (torch.ones(3, 4) @ weight).sum().backward()
        optimizer.step()
    per_step, count = count_per_step(step, 2)
    assert count.counts["mm"] >= 2  # forward, and the weight's gradient in backward
    assert count.counts["add_"] == 2  # the SGD update, once per step
    assert per_step == count.total / 2


def test_optimisers_are_counted_with_their_foreach_implementation_as_on_cuda():
    """On CUDA torch's SGD updates all parameters with a few multi-tensor operators; on a CPU it loops over them.
    The count takes the CUDA choice where the optimiser leaves it to torch, and keeps an explicit choice."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(10)]
    for p in params:
        p.grad = torch.ones(3)
    chosen = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    explicit = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
    for optimizer in (chosen, explicit):
        foreach_as_on_cuda(optimizer)
        optimizer.step()  # makes the momentum buffers
    assert chosen.param_groups[0]["foreach"] is True and explicit.param_groups[0]["foreach"] is False
    counts = [count_per_step(lambda k, o=o: o.step(), 2)[0] for o in (chosen, explicit)]
    assert counts[0] < 10 and counts[1] >= 3 * len(params)  # a few foreach operators, against several per parameter


def step_overhead(row: str, steps: int = COUNTED_STEPS) -> list[int]:
    """Per step, operators of the method's training_step minus those of its own ``training_losses`` in a bare
    LightningModule (clipped as its recipe clips), over ``steps`` steps after 2, in the same kind of Trainer, on
    the same networks and optimiser."""
    pair, entry = bench.PAIRS["tiny_mlp"], bench.ROWS[row]
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        batches = bench.make_batches(pair, 8, 4, torch.device("cpu"))
        module = entry.build(bench.BenchContext(pair, Path(scratch), batches))
        loader = bench._Cycle(batches, 2 + steps + 1)
        cpu = torch.device("cpu")
        method, trainer = bench.count_fit_operators(module, loader, 2, steps, cpu, "32-true", scratch)
        own_losses = bench.Bound(bench.method_step_bound(module).loss, entry.bound(module).clip_norm)
        floor, _ = bench.count_fit_operators(bench.LightningFloor(module, own_losses, trainer), loader, 2, steps, cpu,
                                             "32-true", scratch)
    assert min(floor.each) > 10  # the count saw the networks' work
    return [m - f for m, f in zip(method.each, floor.each)]


@pytest.mark.parametrize("row", list(bench.ROWS))
def test_training_step_adds_only_the_accuracy_to_the_methods_own_operators(row):
    """Every benchmark row (every method, stage and setting): on every step but the few that read the losses,
    the method's ``training_step`` in the Trainer dispatches exactly the accuracy's 2 operators more than the
    method's own ``training_losses`` in a bare LightningModule. One more operator per step (a loss part summed
    on the device every step, a finiteness check) breaks it."""
    extra = step_overhead(row)
    periodic = [n for n in extra if n != ACCURACY_OPERATORS]
    assert len(periodic) <= PERIODIC_STEPS, extra
    assert all(n > ACCURACY_OPERATORS for n in periodic), extra


def test_the_check_catches_per_step_bookkeeping(monkeypatch):
    """Folding the epoch means every step instead of every 64, or reading the losses every step instead of every
    16, makes most steps dispatch more than the accuracy."""
    for target, name in ((EpochMeans, "fold_every"), (nonfinite, "READ_EVERY")):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, 1)
            extra = step_overhead("Supervised")
            assert sum(n != ACCURACY_OPERATORS for n in extra) > PERIODIC_STEPS, (name, extra)


def test_bench_records_operator_counts(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--pairs", "tiny_mlp", "--methods", "BaselineKD", "--batch-size", "8", "--repeats", "1", "--steps",
                "1", "--warmup", "1", "--no-ddp", "--scaling-batch-sizes", "--fit", "--no-overhead", "--no-isolate",
                "--device-ops", "16", "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert record["device_ops_steps"] == 16
    # Lightning's loop adds to the plain-torch bound, our step adds to Lightning's floor
    assert record["bound_device_ops_per_step"] < record["floor_device_ops_per_step"] < record["device_ops_per_step"]
