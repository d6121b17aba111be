"""distill.compile_watch reads torch's private compile state; these tests hold it to the pinned torch, so that a
rename fails here instead of the GPU runs silently reporting no CUDA-graph skips."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

from distill.callbacks import SpeedOptions
from distill.compile_watch import CompileWatch


def test_the_watch_counts_the_graphs_and_graph_breaks_of_a_compiled_function():
    def doubled_plus_one(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    compiled = torch.compile(doubled_plus_one, backend="eager")
    with CompileWatch() as watch:
        compiled(torch.randn(3))
        compiled(torch.randn(3))  # the same shape: no new graph
        compiled(torch.randn(4, 2))  # a new shape: both halves again
    assert watch.report.graphs == 4
    assert sum(watch.report.graph_breaks.values()) == 2
    (reason,) = watch.report.graph_breaks
    assert "graph_break()" in reason and "\n" not in reason
    compiled(torch.randn(5, 5))
    assert watch.stop().graphs == 4  # what happened after the watch is not counted


def test_the_watch_takes_torchs_reasons_for_skipping_cuda_graphs_from_its_log():
    seen = []
    with CompileWatch(on_skip=seen.append) as watch:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (arg0_1)")
    assert watch.report.cudagraph_skips == 3
    assert watch.report.skip_reasons == seen == ["mutated inputs (2 instances)", "cpu device (arg0_1)"]
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to dynamic shapes")
    assert seen == ["mutated inputs (2 instances)", "cpu device (arg0_1)"]  # detached at the end of the watch
    assert watch.report.as_record()["cudagraph_skip_reasons"] == seen


def test_the_watch_counts_the_cuda_graphs_that_a_cpu_compile_cannot_capture():
    """The real path: inductor in a CUDA-graph mode on a CPU skips the CUDA graph of each compiled graph (one
    count for its forward and backward) and only counts it; torch logs the reason on GPUs only."""
    network = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    network.compile(mode="reduce-overhead", dynamic=False)
    with CompileWatch() as watch:
        for batch in (2, 2, 5):  # two shapes: two graphs
            network(torch.randn(batch, 4)).sum().backward()
    assert watch.report.graphs == 2
    assert watch.report.cudagraph_skips == 2
    assert watch.report.skip_reasons == []


@pytest.mark.parametrize("compile_mode", ["reduce-overhead", "default"])
def test_speed_options_warns_once_per_reason_when_torch_runs_a_graph_without_its_cuda_graph(compile_mode):
    speed = SpeedOptions(compile=compile_mode)
    module = nn.Sequential(nn.Linear(4, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        speed.setup(None, module, "fit")
        for _ in range(2):
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)\n\nFound from:\n"
                                                "   File model.py, line 3")
        speed.teardown(None, module, "fit")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to dynamic shapes")  # after the run
    messages = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    if compile_mode == "default":  # no CUDA graphs asked for, nothing to watch
        assert messages == []
        return
    assert len(messages) == 1
    assert "because of mutated inputs (1 instances)." in messages[0] and "Found from" not in messages[0]
    assert "TORCH_LOGS=cudagraphs" in messages[0]


def test_speed_options_stops_watching_when_the_fit_fails():
    speed = SpeedOptions(compile="reduce-overhead")
    module = nn.Sequential(nn.Linear(4, 3))
    speed.setup(None, module, "fit")
    speed.on_exception(None, module, RuntimeError("a failing step"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    assert not [w for w in caught if "CUDA graph" in str(w.message)]
