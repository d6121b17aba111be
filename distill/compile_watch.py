"""What ``torch.compile`` did while a block of work ran: graphs compiled, graph breaks, and the graphs whose CUDA
graphs torch chose not to capture, with its reasons.

A run compiled with ``mode="reduce-overhead"`` that loses its CUDA graphs (an input mutated outside the graph, a
CPU tensor in the graph, a dynamic shape, ...) still trains correctly, but every kernel is launched one by one
again: at CIFAR batch sizes that is most of the speed the mode exists for. torch says so only through a logging
artifact that is off by default (``TORCH_LOGS=cudagraphs``) and a private counter, so a researcher would see a
slow run and no reason. :class:`CompileWatch` collects both; :class:`distill.callbacks.SpeedOptions` warns with
the reason, and the GPU suite records them per row.

This module is the one place that reads torch's private compile state: ``torch._dynamo.utils.counters`` and the
logger of ``torch._inductor.cudagraph_utils``. ``tests/test_compile_watch.py`` checks both against the pinned
torch, so a rename fails a test instead of silently reporting nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

#: The message torch starts each CUDA-graph skip with; the reason follows it.
SKIP_PREFIX = "skipping cudagraphs due to "


def _counters() -> dict[str, Counter]:
    from torch._dynamo.utils import counters

    return counters


def _cudagraph_logger() -> logging.Logger:
    from torch._inductor import cudagraph_utils

    return cudagraph_utils.cudagraphs_log


@dataclass
class CompileReport:
    """What torch.compile did during one watch.

    Attributes:
        graphs: graphs dynamo captured (a recompilation for a new shape or a changed guard counts again).
        graph_breaks: each graph break's reason (its first line) and how often it occurred.
        cudagraph_skips: compiled graphs that run without a CUDA graph (on a CPU every graph of a CUDA-graph mode).
        skip_reasons: torch's reasons for the skips, in order, each once; torch logs them on GPUs only.
    """

    graphs: int = 0
    graph_breaks: dict[str, int] = field(default_factory=dict)
    cudagraph_skips: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def as_record(self) -> dict[str, object]:
        return {"graphs": self.graphs, "graph_breaks": sum(self.graph_breaks.values()),
                "graph_break_reasons": sorted(self.graph_breaks), "cudagraph_skips": self.cudagraph_skips,
                "cudagraph_skip_reasons": list(self.skip_reasons)}


class _SkipHandler(logging.Handler):
    def __init__(self, on_reason: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.on_reason = on_reason

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(SKIP_PREFIX):
            self.on_reason(message[len(SKIP_PREFIX):].strip())


class CompileWatch:
    """Counts what torch.compile does between :meth:`start` and :meth:`stop` (or inside ``with``).

    Args:
        on_skip: called with each new CUDA-graph skip reason as torch logs it (once per distinct reason), e.g. to
            warn at once rather than after the run.
    """

    def __init__(self, on_skip: Callable[[str], None] | None = None) -> None:
        self.on_skip = on_skip
        self._before: dict[str, Counter] | None = None
        self._handler: _SkipHandler | None = None
        self._reasons: list[str] = []
        self.report = CompileReport()

    def _reason(self, reason: str) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)
            if self.on_skip is not None:
                self.on_skip(reason)

    def start(self) -> "CompileWatch":
        if self._handler is None:
            self._before = {name: Counter(values) for name, values in _counters().items()}
            self._handler = _SkipHandler(self._reason)
            _cudagraph_logger().addHandler(self._handler)
        return self

    def stop(self) -> CompileReport:
        """Detaches from torch's logger and returns the report (again, unchanged, on a second call)."""
        if self._handler is None or self._before is None:
            return self.report
        _cudagraph_logger().removeHandler(self._handler)
        self._handler = None
        now, before = _counters(), self._before

        def added(group: str) -> Counter:
            return Counter(now.get(group, Counter())) - before.get(group, Counter())

        breaks: Counter = Counter()
        for reason, count in added("graph_break").items():
            breaks[str(reason).strip().splitlines()[0]] += count
        self.report = CompileReport(graphs=added("stats")["unique_graphs"], graph_breaks=dict(breaks),
                                    cudagraph_skips=added("inductor")["cudagraph_skips"],
                                    skip_reasons=list(self._reasons))
        return self.report

    def __enter__(self) -> "CompileWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["CompileReport", "CompileWatch", "SKIP_PREFIX"]
