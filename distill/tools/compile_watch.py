"""What ``torch.compile`` did while a block of work ran: graphs compiled, graph breaks, and the graphs whose CUDA
graphs torch chose not to capture, with its reasons.

A run compiled with ``mode="reduce-overhead"`` that loses its CUDA graphs (an input mutated outside the graph, a
CPU tensor in the graph, a dynamic shape, ...) still trains correctly, but every kernel is launched one by one
again: at CIFAR batch sizes that is most of the speed the mode exists for. torch says so in a log line on stderr
(its ``cudagraphs`` logging artifact) and counts it in a private counter; :class:`CompileWatch` collects both for
one block, so that the GPU suite records, per row, how many graphs a compiled row had, whether any ran without a
CUDA graph, and torch's reason, in its JSON and its table rather than somewhere in the machine's stderr.

This module is the one place that reads torch's private compile state: ``torch._dynamo.utils.counters`` and the
logger of ``torch._inductor.cudagraph_utils`` (with ``torch._inductor``'s as a fallback, to which it propagates).
``tests/test_compile_watch.py`` checks both against the pinned torch, calling torch's own skip logger.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

#: The message torch starts each CUDA-graph skip with; the reason follows it.
SKIP_PREFIX = "skipping cudagraphs due to "


def _counters() -> dict[str, Counter]:
    from torch._dynamo.utils import counters

    return counters


def _cudagraph_logger() -> logging.Logger:
    from torch._inductor import cudagraph_utils

    logger = getattr(cudagraph_utils, "cudagraphs_log", None)
    return logger if isinstance(logger, logging.Logger) else logging.getLogger("torch._inductor")


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


class _SkipReasons(logging.Handler):
    """Keeps the reason of each CUDA-graph skip torch logs, each once, in order."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        reason = message[len(SKIP_PREFIX):].strip() if message.startswith(SKIP_PREFIX) else None
        if reason is not None and reason not in self.reasons:
            self.reasons.append(reason)


class CompileWatch:
    """Counts what torch.compile does between :meth:`start` and :meth:`stop` (or inside ``with``)."""

    def __init__(self) -> None:
        self._before: dict[str, Counter] | None = None
        self._handler: _SkipReasons | None = None
        self.report = CompileReport()

    def start(self) -> "CompileWatch":
        if self._handler is None:
            self._before = {name: Counter(values) for name, values in _counters().items()}
            self._handler = _SkipReasons()
            _cudagraph_logger().addHandler(self._handler)
        return self

    def stop(self) -> CompileReport:
        """Detaches from torch's logger and returns the report (again, unchanged, on a second call)."""
        if self._handler is None or self._before is None:
            return self.report
        _cudagraph_logger().removeHandler(self._handler)
        reasons, self._handler = self._handler.reasons, None
        now, before = _counters(), self._before

        def added(group: str) -> Counter:
            return Counter(now.get(group, Counter())) - before.get(group, Counter())

        breaks: Counter = Counter()
        for reason, count in added("graph_break").items():
            breaks[str(reason).strip().splitlines()[0]] += count
        self.report = CompileReport(graphs=added("stats")["unique_graphs"], graph_breaks=dict(breaks),
                                    cudagraph_skips=added("inductor")["cudagraph_skips"],
                                    skip_reasons=reasons)
        return self.report

    def __enter__(self) -> "CompileWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["CompileReport", "CompileWatch", "SKIP_PREFIX"]
