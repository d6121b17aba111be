"""The one-command GPU benchmark (issue 20): every method's full training loop on CIFAR-10, eager and compiled.

On a GPU machine, from the project's root, with the CIFAR-10 JPEG copy unpacked under ``data/``::

    python -m distill.tools.gpu_suite --json reports/gpu-suite.json --markdown reports/gpu-suite.md

and, on a CPU, the same rows on generated data and MLPs, a few steps each, to check that everything runs::

    python -m distill.tools.gpu_suite --tiny

What it measures, one record per row (``kind: "loop"``): ``Trainer.fit`` of the method's real LightningModule on
device-resident CIFAR-10 (``data.device_resident: true``, ``augment: cifar``, the recipe's pad-4 crop + flip on
the device; PatientConsistentKD crops and mixes on the device itself), ``trainer.precision: bf16-mixed``,
``channels_last`` and the optimiser's fused kernel (the GPU overlay's settings), with no logger, checkpoint or
validation. A first epoch of ``--steps`` batches warms up (compilation, CUDA-graph capture, cuDNN's algorithm
search); the second is timed, with one device synchronisation at its start and one at its end, so the figure is
what the loop sustains:

* ``images_per_s``: images of the timed epoch over its wall time;
* ``host_wait_share``: the share of that time the training process spent between one step's end and the next
  step's start (fetching and augmenting the batch, Lightning's loop): on the device path this is host time
  that the device may overlap, an upper bound of the time the GPU waits for data;
* ``device_wait_share`` (CUDA only): the share the GPU itself spent between one step's last kernel and the next
  step's first, measured with CUDA events read once after the epoch: the resident batch's gather and
  augmentation kernels plus any time the GPU sat idle waiting for the host to queue work (issue 20's "waiting for
  data", which must stay under 2 %);
* ``syncs_per_step``: host-device synchronisations per timed step, counted by
  ``torch.cuda.set_sync_debug_mode("warn")`` (the loss reads every 16 steps are expected; CUDA only);
* ``peak_memory_mb``: ``torch.cuda.max_memory_allocated`` of the row;
* ``graphs``, ``graph_breaks``, ``cudagraph_skips`` and their reasons: what torch.compile did during the row
  (:class:`distill.tools.compile_watch.CompileWatch`), so that a compiled row whose graphs ran without their CUDA graphs
  says so, and why, in the table's note.

Rows (:func:`suite_rows`), in the order they run, the quick ones that issue 20's targets name first: on
resnet32x4 → resnet8x4 at batch 64, Supervised and BaselineKD eager, then the same compiled (``torch.compile`` of
every network in :data:`COMPILE_MODE`, through :class:`distill.callbacks.SpeedOptions`; the timed batches all have
the same shape), and BaselineKD compiled at batch 256. Then ``--concurrent N`` copies of a small-student row
(Supervised resnet8x4, batch 64) run at once in separate processes on the same GPU: their summed images/s against
one run's (``kind: "concurrent"``: all their timed images over the wall time from the first timed epoch's start to
the last one's end, after a barrier that starts them together). Then BaselineKD with the every-view teacher cache
(its one-off build, the suite's longest pass, is timed as ``cache_build_s``) at batch 64 eager and compiled and at
batch 256 compiled; then the others, eager: Supervised and BaselineKD (online, cached) at batch 256; each
TeacherAssistantKD stage, each ResidualKD stage and PatientConsistentKD function matching at batch 64; Supervised
and BaselineKD (online, cached) on resnet56 → resnet20 at batch 64. Finally the step benchmark's plain-torch bound of BaselineKD, eager and compiled
(``distill.tools.bench``'s step rows: ``kind: "step"``), for the loop's distance from the bare computation.

The suite stops starting rows after ``--budget-s`` seconds (default 330, so that it ends within 6 minutes on an
H200) and lists the rows it skipped; the JSON and Markdown are written either way. A row that fails is reported
and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from distill.callbacks import SpeedOptions
from distill.data import DistillDataModule
from distill.methods import BaselineKD, DistillModule
from distill.run import child_environment, write_json_atomic
from distill.tools import bench
from distill.tools.compile_watch import CompileWatch

#: torch.compile mode of the compiled rows: "reduce-overhead" captures the compiled networks' forward and
#: backward passes in CUDA graphs (the step is launch-bound at batch 64).
COMPILE_MODE = "reduce-overhead"


@dataclass(frozen=True)
class Row:
    """One full-loop measurement: a row of the step benchmark's :data:`distill.tools.bench.ROWS` (or
    ``BaselineKD+views``, the every-view teacher cache) on a pair, at a batch size, eager or compiled."""

    method: str
    pair: str
    batch_size: int
    compile: str | None = None

    @property
    def name(self) -> str:
        mode = f", compiled ({self.compile})" if self.compile else ""
        return f"{self.method} on {self.pair}, batch {self.batch_size}{mode}"


VIEWS = "BaselineKD+views"
EAGER_64 = ("Supervised", "BaselineKD", VIEWS, "TeacherAssistantKD/ta1", "TeacherAssistantKD/student",
            "ResidualKD/student", "ResidualKD/assistant", "PatientConsistentKD/function_matching")


def suite_rows(large: str = "resnet32x4_resnet8x4", small: str = "resnet56_resnet20") -> tuple[list[Row], list[Row]]:
    """The suite's rows in the order they run, as ``(before, after)`` the concurrent runs: first the online rows
    that issue 20's targets name (eager, then compiled); then, after the concurrent runs (a target too), the
    every-view cache rows, whose first builds the cache (the teacher over 162 views of every training image, the
    suite's longest pass), and the rest. A budget that runs out then leaves out rows at the end, not the quick
    targets."""
    before = [Row(method, large, 64) for method in ("Supervised", "BaselineKD")]
    before += [Row(method, large, 64, COMPILE_MODE) for method in ("Supervised", "BaselineKD")]
    before += [Row("BaselineKD", large, 256, COMPILE_MODE)]
    after = [Row(VIEWS, large, 64), Row(VIEWS, large, 64, COMPILE_MODE), Row(VIEWS, large, 256, COMPILE_MODE)]
    after += [Row(method, large, 256) for method in ("Supervised", "BaselineKD", VIEWS)]
    after += [Row(method, large, 64) for method in EAGER_64[3:]]
    after += [Row(method, small, 64) for method in ("Supervised", "BaselineKD", VIEWS)]
    return before, after


# ------------------------------------------------------------------------------------------ one row
class LoopTimer(L.Callback):
    """Times the second training epoch (the first warms up) with one synchronisation at each end, and stops the
    fit after it (a staged method's stages may be longer); host time between steps; synchronisations."""

    def __init__(self, device: torch.device, barrier: tuple[str, int] | None = None) -> None:
        self.device = device
        #: ``(folder, processes)``: wait before the timed epoch until that many processes are ready there, so
        #: that concurrent runs time the same stretch of wall time
        self.barrier = barrier
        self.images = 0
        self.steps = 0
        self.seconds = 0.0
        self.host_wait = 0.0
        #: seconds the GPU spent between one timed step's last kernel and the next step's first (CUDA only)
        self.device_wait: float | None = None
        self._gaps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._step_end: torch.cuda.Event | None = None
        self.syncs: int | None = None
        self.wall = [0.0, 0.0]
        self._timing = False
        self._mark = 0.0
        self._caught: Any = None
        self._records: list[warnings.WarningMessage] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _event(self) -> torch.cuda.Event | None:
        """A timing event queued on the current stream now (no synchronisation); None off CUDA."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._timing = trainer.current_epoch == 1
        if not self._timing:
            return
        if self.barrier is not None:
            wait_for_peers(Path(self.barrier[0]), self.barrier[1])
        self._sync()
        if self.device.type == "cuda":  # every synchronising call warns while the epoch runs
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._start = self._mark = time.perf_counter()
        self.wall = [time.time(), 0.0]  # the timed stretch on the wall clock, to overlap concurrent runs

    def _stop_counting(self) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
            self.syncs = sum("synchroniz" in str(w.message) for w in self._records)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_counting()  # a row that failed in its timed epoch leaves no warning filter behind

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._timing:
            self.host_wait += time.perf_counter() - self._mark
            # the GPU reaches this event once it has run the batch's own kernels (the resident data's gather and
            # augmentation) and waited for the host to queue them: from the previous step's end to here it
            # worked on data or idled
            start = self._event()
            if self._step_end is not None and start is not None:
                self._gaps.append((self._step_end, start))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._timing:
            self.images += batch[0].shape[0]
            self.steps += 1
            self._step_end = self._event()
            self._mark = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._timing:
            return
        self._stop_counting()
        self._sync()
        self.seconds = time.perf_counter() - self._start
        if self._gaps:  # CUDA: the events have all completed, reading them waits for nothing
            self.device_wait = sum(end.elapsed_time(start) for end, start in self._gaps) / 1000
        self._gaps, self._step_end = [], None
        self.wall[1] = time.time()
        self._timing = False
        trainer.should_stop = True


def wait_for_peers(folder: Path, processes: int, timeout_s: float = 300.0) -> None:
    """Marks this process ready in ``folder`` and waits until ``processes`` processes are."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob("ready-*"))) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(folder.glob('ready-*')))} of {processes} concurrent runs got ready "
                               f"within {timeout_s:.0f} s")
        time.sleep(0.01)


def suite_data(tiny: bool, data_dir: str, device: torch.device) -> DistillDataModule:
    """Device-resident training data, set up once for all rows (the decode is not part of any row)."""
    if tiny:
        data = DistillDataModule(dataset="fake", num_classes=10, in_channels=1, image_size=8,
                                 fake_sizes=[256, 16, 16], batch_size=16, device_resident=True, augment="cifar")
    else:
        if not Path(data_dir).is_dir():
            raise SystemExit(f"the CIFAR-10 JPEG copy is not at {data_dir}: unpack it first (mkdir -p data && tar "
                             "-xzf PATH/cifar10-jpeg.tar.gz -C data) or give --data-dir")
        data = DistillDataModule(dataset="imagefolder", data_dir=data_dir, batch_size=64, device_resident=True,
                                 augment="cifar")
    data.setup("fit")
    return data


def build_module(row: Row, pair: bench.Pair, workdir: Path) -> DistillModule:
    context = bench.BenchContext(pair, workdir)
    if row.method == VIEWS:
        return BaselineKD(student=pair.student, teacher=context.network_file("teacher"), cache_teacher_outputs=True,
                          teacher_cache_dir=str(workdir / "teacher_cache"), **context.geometry)
    return bench.ROWS[row.method].build(context)


def measure_row(row: Row, data: DistillDataModule, device: torch.device, precision: str, steps: int,
                workdir: Path, barrier: tuple[str, int] | None = None) -> dict[str, Any]:
    """The full loop of one row: a warm-up epoch, then a timed one, of ``steps`` batches each."""
    base = bench.PAIRS[row.pair]
    pair = replace(base, image_size=data.image_size, in_channels=data.in_channels, num_classes=data.num_classes)
    L.seed_everything(0, verbose=False)
    module = build_module(row, pair, workdir)
    data.batch_size = row.batch_size
    data.augment = "none" if module.augments_on_device else "cifar"
    data.training_views = False
    timer = LoopTimer(device, barrier)
    speed = SpeedOptions(channels_last=device.type == "cuda", compile=row.compile or False, fused_optimizer=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stages = module.hparams.get("stage_epochs")  # a staged method's Trainer must span its stages
    trainer = bench._quiet_trainer(device, precision, max_epochs=sum(stages) if stages else 2, limit_train_batches=steps,
                                   callbacks=[timer, speed], default_root_dir=str(workdir))
    started = time.perf_counter()
    with CompileWatch() as watch:
        trainer.fit(module, datamodule=data)
    record = {
        "kind": "loop", "row": row.name, **asdict(row), "teacher": getattr(module, "teacher", None) is not None,
        "student": pair.student, "device": bench.describe_device(device), "precision": precision,
        "images_per_s": round(timer.images / timer.seconds, 1) if timer.seconds else None,
        "host_wait_share": round(timer.host_wait / timer.seconds, 4) if timer.seconds else None,
        "device_wait_share": round(timer.device_wait / timer.seconds, 4)
        if timer.device_wait is not None and timer.seconds else None,
        "syncs_per_step": round(timer.syncs / timer.steps, 3) if timer.syncs is not None and timer.steps else None,
        "timed_steps": timer.steps, "timed_images": timer.images, "timed_wall": timer.wall,
        "peak_memory_mb": round(bench.peak_memory_mb(device), 1),
        "wall_s": round(time.perf_counter() - started, 1),
        **watch.report.as_record(),
    }
    if row.method == VIEWS:
        record["views"] = int(module.cached_logits.shape[1])
    return record


# ------------------------------------------------------------------------------------------ concurrency
def measure_concurrent(row: Row, copies: int, args: argparse.Namespace) -> dict[str, Any]:
    """``copies`` processes running ``row`` at once on the same device: their summed images/s."""
    with tempfile.TemporaryDirectory() as barrier:
        worker = {"row": asdict(row), "steps": args.steps, "tiny": args.tiny, "data_dir": args.data_dir,
                  "device": args.device, "precision": args.precision, "barrier": [barrier, copies]}
        command = [sys.executable, "-m", "distill.tools.gpu_suite", "--worker", json.dumps(worker)]
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=child_environment(default_threads=None)) for _ in range(copies)]
        records = []
        for process in processes:
            out, err = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"a concurrent run failed:\n{err[-2000:]}")
            records.append(json.loads(out.strip().splitlines()[-1]))
    # all the images the runs trained in their timed epochs over the wall time from the first start to the last end
    span = max(r["timed_wall"][1] for r in records) - min(r["timed_wall"][0] for r in records)
    return {"kind": "concurrent", "row": f"{copies} × {row.name}", **asdict(row), "copies": copies,
            "images_per_s": round(sum(r["timed_images"] for r in records) / span, 1),
            "per_run_images_per_s": [r["images_per_s"] for r in records],
            "device": records[0]["device"], "precision": args.precision}


# ------------------------------------------------------------------------------------------ the command
def failure_line(name: str, error: Exception) -> str:
    """A failed row in one line: its name, the error's type and the last line of its message."""
    return f"{name}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1]}"


def compile_note(record: dict[str, Any]) -> str:
    """What torch.compile did in a compiled row: its graphs, graph breaks, and graphs run without a CUDA graph (on a
    GPU, with torch's first reason; on a CPU every graph)."""
    parts = [f"{record.get('graphs', 0)} graphs"]
    if record.get("graph_breaks"):
        parts.append(f"{record['graph_breaks']} graph breaks")
    if record.get("cudagraph_skips"):
        reasons = record.get("cudagraph_skip_reasons") or []
        why = f" ({reasons[0].splitlines()[0]})" if reasons else ""
        parts.append(f"{record['cudagraph_skips']} without a CUDA graph{why}")
    return ", ".join(parts)


def markdown(records: list[dict[str, Any]], skipped: list[str], failures: list[str], header: str) -> str:
    lines = [header, "", "| row | img/s | host wait | GPU wait | syncs/step | peak MB | wall s | note |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in records:
        note = ""
        if r["kind"] == "concurrent":
            single = next((x["images_per_s"] for x in records if x["kind"] == "loop" and x["row"] == r["row"].split(" × ", 1)[1]), None)
            note = f"{r['images_per_s'] / single:.2f}× one run" if single else ""
        if r.get("cache_build_s") is not None:
            note = f"view cache ({r.get('views')} views) built in {r['cache_build_s']:.0f} s"
        if r.get("compile"):
            note = "; ".join(filter(None, [note, compile_note(r)]))
        if r["kind"] == "step":
            note = f"step / plain-torch bound {fmt(r.get('ratio'), '.2f')} (bound {fmt(r.get('bound_images_per_s'), '.0f')} img/s)"
        lines.append(f"| {r['row']} | {fmt(r.get('images_per_s'), ',.0f')} | {fmt(r.get('host_wait_share'), '.1%')} | "
                     f"{fmt(r.get('device_wait_share'), '.1%')} | "
                     f"{fmt(r.get('syncs_per_step'), '.2f')} | {fmt(r.get('peak_memory_mb'), ',.0f')} | "
                     f"{fmt(r.get('wall_s'), '.0f')} | {note} |")
    if skipped:
        lines += ["", "Not run (the time budget was spent): " + "; ".join(skipped) + "."]
    if failures:
        lines += ["", "Failed: " + "; ".join(failures) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill.tools.gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/cifar10-jpeg", help="the CIFAR-10 JPEG copy (ImageFolder layout)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch (warm-up and timed; default 150)")
    parser.add_argument("--concurrent", type=int, default=4, help="copies of the small-student row run at once (0: none)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no row after this many seconds")
    parser.add_argument("--only", nargs="+", help="rows whose name contains one of these strings")
    parser.add_argument("--no-step-bounds", dest="step_bounds", action="store_false",
                        help="skip the plain-torch step rows of BaselineKD")
    parser.add_argument("--tiny", action="store_true", help="generated data and MLPs, for a check on a CPU")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.steps = args.steps or (3 if args.tiny else 150)
    return args


def tiny_rows(rows: list[Row]) -> list[Row]:
    """The same rows on the test pair, batch 16 (a CPU check; torch.compile only where the row is compiled)."""
    seen, out = set(), []
    for row in rows:
        small = replace(row, pair="tiny_mlp", batch_size=16 if row.batch_size == 64 else 32)
        if small not in seen:
            seen.add(small)
            out.append(small)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    # Every compiled row compiles the same network classes at a few batch shapes; dynamo's default of 8 graphs
    # per function would let a late row fall back to eager without a word.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if args.worker:  # one row in its own process (the concurrent runs); the record is stdout's last line
        spec = json.loads(args.worker)
        data = suite_data(spec["tiny"], spec["data_dir"], device)
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(measure_row(Row(**spec["row"]), data, device, spec["precision"], spec["steps"],
                                         Path(scratch), tuple(spec["barrier"]))))
        return []
    started = time.perf_counter()
    before, after = suite_rows()
    if args.tiny:
        before = tiny_rows(before)
        after = [row for row in tiny_rows(after) if row not in before]
    if args.only:
        before, after = ([row for row in group if any(part in row.name for part in args.only)] for group in (before, after))
    rows = before + after
    header = (f"GPU suite: {bench.environment()}; {args.precision}, {'generated data (--tiny)' if args.tiny else 'CIFAR-10 JPEG, device-resident, augment cifar'}, "
              f"{args.steps} warm-up + {args.steps} timed steps per row")
    print(header, flush=True)
    data = suite_data(args.tiny, args.data_dir, device)
    with tempfile.TemporaryDirectory() as scratch:  # first-use costs (cuDNN, allocator, lazy imports) in no row
        measure_row(Row("Supervised", rows[0].pair if rows else "tiny_mlp", 64 if not args.tiny else 16), data,
                    device, args.precision, min(args.steps, 20), Path(scratch))
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    failures: list[str] = []

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.budget_s

    def save(finished: bool = False) -> str:
        """The JSON and Markdown as they stand, rewritten after every row: a run killed at the device's time limit
        still leaves the rows it measured (``finished`` false)."""
        table = markdown(records, skipped, failures, header)
        if args.json:
            write_json_atomic(args.json, {"header": header, "finished": finished, "records": records,
                                          "skipped": skipped, "failures": failures})
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table + ("" if finished else "\n(the suite had not finished when this was written)\n"))
        return table

    def run(group: list[Row], scratch: Path) -> None:
        for row in group:
            if out_of_time():
                skipped.append(row.name)
                continue
            try:
                record = measure_row(row, data, device, args.precision, args.steps, scratch)
            except Exception as error:  # noqa: BLE001 - one row's failure must not cost the others
                failures.append(failure_line(row.name, error))
                print(f"(row failed: {failures[-1]})", file=sys.stderr, flush=True)
                save()
                continue
            if row.method == VIEWS and not any(r["method"] == VIEWS and r["pair"] == row.pair for r in records):
                record["cache_build_s"] = record["wall_s"]  # the first view row built the pair's cache
            records.append(record)
            save()
            print(markdown([record], [], [], "").splitlines()[-1], flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        run(before, Path(scratch))
        small = next((row for row in rows if row.method == "Supervised" and not row.compile and row.batch_size == rows[0].batch_size), None)
        if args.concurrent > 1 and small is not None:
            if out_of_time():
                skipped.append(f"{args.concurrent} concurrent runs")
            else:
                try:
                    records.append(measure_concurrent(small, args.concurrent, args))
                except Exception as error:  # noqa: BLE001
                    failures.append(f"concurrent runs: {type(error).__name__}: {str(error)[-300:]}")
                save()
        run(after, Path(scratch))
    if args.step_bounds:
        pair = "tiny_mlp" if args.tiny else "resnet32x4_resnet8x4"
        for compile_mode in (False, COMPILE_MODE):
            name = f"BaselineKD step on {pair}, batch {rows[0].batch_size if rows else 64}{', compiled' if compile_mode else ''}"
            if out_of_time():
                skipped.append(name)
                continue
            try:
                step = bench.measure_step(bench.StepSpec(
                    "BaselineKD", pair, rows[0].batch_size if rows else 64, args.device, args.precision,
                    steps=10 if not args.tiny else 2, warmup=5 if not args.tiny else 1, repeats=3,
                    channels_last=device.type == "cuda", compile=compile_mode, threads=torch.get_num_threads(),
                    floor=False))
                records.append({**step, "kind": "step", "row": name})
            except Exception as error:  # noqa: BLE001
                failures.append(failure_line(name, error))
            save()
    table = save(finished=True)
    print(f"\n{table}\nin {time.perf_counter() - started:.0f} s")
    if failures:
        raise SystemExit(1)
    return records


if __name__ == "__main__":
    main()
