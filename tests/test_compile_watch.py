"""distill.tools.compile_watch reads torch's private compile state; these tests hold it to the pinned torch, so that a
rename fails here instead of the GPU runs silently reporting no CUDA-graph skips."""

from __future__ import annotations

import torch
from torch import nn
from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

from distill.tools.compile_watch import CompileWatch


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
    with CompileWatch() as watch:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (arg0_1)")
    reasons = ["mutated inputs (2 instances)", "cpu device (arg0_1)"]
    assert watch.report.cudagraph_skips == 3
    assert watch.report.skip_reasons == reasons
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to dynamic shapes")
    assert watch.stop().skip_reasons == reasons  # detached at the end of the watch
    assert watch.report.as_record()["cudagraph_skip_reasons"] == reasons


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
