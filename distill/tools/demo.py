"""``make demo``: the main job on the embedded data set, end to end through the ``distill`` CLI.

Trains a teacher on ``mnist5k``, then the same student architecture from scratch and with BaselineKD
from that teacher, and prints their test accuracies (each from its best-validation checkpoint).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from distill.cli import main as distill_main

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "mnist5k"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(config: str, *extra: str) -> dict:
    cli = distill_main(["fit", "--config", str(CONFIG_DIR / config), *QUIET, *extra])
    assert cli is not None and cli.results is not None
    return cli.results


def main(argv: list[str] | None = None) -> None:
    extra = list(argv if argv is not None else sys.argv[1:])
    started = time.time()
    teacher = _fit("teacher.yaml", *extra)
    scratch = _fit("scratch.yaml", *extra)
    kd = _fit("kd.yaml", "--model.init_args.teacher", teacher["model_file"], *extra)
    rows = [("teacher", teacher), ("student, from scratch", scratch), ("student, BaselineKD", kd)]
    print(f"\nmnist5k test accuracy (best-validation checkpoint; 1,000 test images), {time.time() - started:.0f} s")
    print(f"{'model':<24}{'network':<16}{'test acc':>10}{'val acc':>10}{'epochs':>8}")
    for label, result in rows:
        print(f"{label:<24}{result['student']:<16}{result['test_acc']:>10.4f}"
              f"{result['best_val_acc']:>10.4f}{result['epochs']:>8}")
    gain = kd["test_acc"] - scratch["test_acc"]
    print(f"\nKD gain over scratch: {gain * 100:+.1f} points")
    print("Run directories:")
    for label, result in rows:
        print(f"  {label:<22} {result['run_dir']}")
    print(f"TensorBoard: tensorboard --logdir {Path(teacher['run_dir']).parents[1]}")


if __name__ == "__main__":
    main()
