"""``make demo``: the main job on the embedded data set, end to end through the ``distill`` CLI.

Trains a teacher on ``mnist5k`` (``configs/mnist5k/teacher_cnn.yaml``: a small CNN, resnet8), then Hinton et al.'s
800-800 MLP student from scratch (``scratch.yaml``) and with BaselineKD from that teacher (``kd.yaml``), each student
with several seeds (one seed of mnist5k's 1,000 test images says little: a digit is 0.1 points), and prints their
test accuracies (each from its best-validation checkpoint) and the KD gain seed by seed. The CNN teacher is ours:
Hinton's MLP teacher (``teacher.yaml``) is barely better than the student here, and its gain came and went with
the seed (see the config's header).

    python -m distill.tools.demo                          # seeds 0 1 2, the configs' full length (about 2 minutes)
    python -m distill.tools.demo --seeds 0 --trainer.max_epochs=2   # other flags go to every `distill fit`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from distill.cli import main as distill_main

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "mnist5k"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DEFAULT_SEEDS = (0, 1, 2)


def _fit(config: str, *extra: str) -> dict:
    cli = distill_main(["fit", "--config", str(CONFIG_DIR / config), *QUIET, *extra])
    assert cli is not None and cli.results is not None
    return cli.results


def _mean_sd(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(prog="python -m distill.tools.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds of the two students (the teacher is trained once, seed 0); default: 0 1 2")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    started = time.time()
    teacher = _fit("teacher_cnn.yaml", "--seed_everything=0", *extra)
    runs: dict[str, list[dict]] = {"teacher": [teacher], "scratch": [], "kd": []}
    for seed in args.seeds:
        runs["scratch"].append(_fit("scratch.yaml", f"--seed_everything={seed}", *extra))
        runs["kd"].append(_fit("kd.yaml", "--model.init_args.teacher", teacher["model_file"],
                               f"--seed_everything={seed}", *extra))
    rows = [("teacher", "teacher"), ("student, from scratch", "scratch"), ("student, BaselineKD", "kd")]
    seeds = " ".join(map(str, args.seeds))
    print(f"\nmnist5k test accuracy (best-validation checkpoint; 1,000 test images), {time.time() - started:.0f} s;"
          f" students: mean ± sd over seeds {seeds}")
    print(f"{'model':<24}{'network':<16}{'test acc':>18}{'best val acc':>18}{'epochs':>8}")
    for label, key in rows:
        results = runs[key]
        print(f"{label:<24}{results[0]['student']:<16}{_mean_sd([r['test_acc'] for r in results]):>18}"
              f"{_mean_sd([r['best_val_acc'] for r in results]):>18}{results[0]['epochs']:>8}")
    gains = [100 * (kd["test_acc"] - scratch["test_acc"]) for scratch, kd in zip(runs["scratch"], runs["kd"])]
    better = sum(gain > 0 for gain in gains)
    print(f"\nKD gain over scratch, test accuracy (points), seed by seed: "
          f"{', '.join(f'{g:+.1f}' for g in gains)} (mean {statistics.mean(gains):+.2f}; KD better in {better} of "
          f"{len(gains)})")
    print("Run directories:")
    for label, key in rows:
        for result in runs[key]:
            print(f"  {label:<22} {result['run_dir']}")
    print(f"TensorBoard: tensorboard --logdir {Path(teacher['run_dir']).parents[1]}")
    return runs


if __name__ == "__main__":
    main()
