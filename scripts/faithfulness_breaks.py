"""Breaks each method on purpose, in a copy of the source tree, and checks that the golden tests notice.

    python scripts/faithfulness_breaks.py                 # every break (about 25 s each on 2 CPU cores)
    python scripts/faithfulness_breaks.py "P&C" alpha     # only breaks whose name contains one of these

For every break below, the tree (without .git, .venv, runs) is copied to a temporary folder, one piece of
source text is replaced, and ``tests/test_faithfulness.py`` runs there with this interpreter; a break that
no test fails is MISSED and the exit status is 1. A break whose text is no longer in the source (after a
refactoring) is reported as STALE: rewrite it against the new code, do not drop it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/test_faithfulness.py"

#: (name, file, text in the source, text that breaks it)
BREAKS = [
    ("exchange alpha", "distill/losses.py",
     '"loss": (1 - alpha) * loss_ce + alpha * loss_kd', '"loss": alpha * loss_ce + (1 - alpha) * loss_kd'),
    ("drop tau^2", "distill/losses.py", "return kl * temperature**2", "return kl"),
    ("tau on the hard term", "distill/losses.py",
     "F.cross_entropy(student_logits.float(), labels", "F.cross_entropy(student_logits.float() / temperature, labels"),
    ("KL reversed", "distill/losses.py",
     "F.kl_div(log_p_s, log_p_t,", "F.kl_div(log_p_t, log_p_s,"),
    ("teacher left requiring gradients", "distill/methods/teacher_student.py",
     "self.teacher = network.eval().requires_grad_(False)", "self.teacher = network.eval()"),
    ("teacher run in train mode", "distill/methods/teacher_student.py",
     "            logits = teacher(images)", "            logits = teacher.train()(images)"),
    ("TAKD stage taught by the original teacher", "distill/methods/teacher_assistant.py",
     "return self.teacher if self.stage == 0 else self.networks()[self.stage - 1]", "return self.teacher"),
    ("TAKD earlier networks not frozen", "distill/methods/teacher_assistant.py",
     "return [network for position, network in enumerate(self.networks()) if position != self.stage]", "return []"),
    ("staged: frozen networks in train mode", "distill/methods/staged.py",
     "                module.eval()  # a frozen", "                pass  # a frozen"),
    ("staged: next stage from the last, not the best, weights", "distill/methods/staged.py",
     "            self.load_trained_state(self._best_state)", "            pass"),
    ("staged: no optimiser restart", "distill/methods/staged.py",
     "            self._restart_optimisation()", "            pass"),
    ("P&C label term", "distill/methods/patient.py",
     'return logits, {"loss": kd_loss(logits, teacher, self.hparams.temperature)}',
     'return logits, {"loss": kd_loss(logits, teacher, self.hparams.temperature) + 0.1 * F.cross_entropy(logits, batch.labels)}'),
    ("P&C temperature dropped", "distill/methods/patient.py",
     "kd_loss(logits, teacher, self.hparams.temperature)}", "kd_loss(logits, teacher, 1.0)}"),
    ("P&C teacher gets an unmixed view", "distill/methods/patient.py",
     "teacher = student if teacher_size == size else augment.crop_resize(images, boxes, teacher_size, flips, mix=a)",
     "teacher = augment.crop_resize(images, boxes, teacher_size, flips)"),
    ("P&C teacher gets the student's view", "distill/methods/patient.py",
     "teacher = student if teacher_size == size else augment.crop_resize(images, boxes, teacher_size, flips, mix=a)",
     "teacher = student"),
    ("P&C independent teacher gets the student's crop", "distill/methods/patient.py",
     "            boxes, flips = crops()\n            return Views(student", "            return Views(student"),
    ("P&C mixup weight on the partner", "distill/methods/patient.py",
     "a = augment.sample_mixup(generator, hp.mixup_alpha) if", "a = 1 - augment.sample_mixup(generator, hp.mixup_alpha) if"),
    ("P&C fixed teacher caches a mirrored view", "distill/methods/patient.py",
     "augment.central_boxes(len(images), *images.shape[-2:]), size))",
     "augment.central_boxes(len(images), *images.shape[-2:]), size, torch.ones(len(images), dtype=torch.bool)))"),
    ("P&C warm-up off by one", "distill/optim.py",
     "ramp = min(1.0, step / warmup_steps)", "ramp = min(1.0, (step + 1) / warmup_steps)"),
    ("ResidualKD frozen S not frozen", "distill/methods/residual_kd.py",
     "return self._parts(frozen) if frozen is not None else []", "return []"),
    ("ResidualKD A fitted to the teacher, not the residual", "distill/methods/residual_kd.py",
     "feature_mse(a, t - s)", "feature_mse(a, t)"),
    ("ResidualKD M.2 uses every block from the start", "distill/methods/residual_kd.py",
     "used = min(blocks, 1 + max(0, self.current_epoch - start) * blocks // epochs)", "used = blocks"),
    ("ResidualKD CE term with the teacher's classifier", "distill/methods/residual_kd.py",
     'if self.hparams.classifier == "trained":\n            losses["loss_ce"]', 'if True:\n            losses["loss_ce"]'),
]


def run_break(name: str, file: str, source: str, broken: str) -> tuple[str, list[str]]:
    with tempfile.TemporaryDirectory(prefix="distill-break-") as folder:
        tree = Path(folder) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__"))
        path = tree / file
        text = path.read_text()
        if text.count(source) != 1:
            return "STALE", []
        path.write_text(text.replace(source, broken))
        # run in the copy: its folder comes first on sys.path, so `distill` is the broken copy
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS], cwd=tree,
                             capture_output=True, text=True).stdout
    failed = sorted(set(re.findall(r"FAILED tests/test_faithfulness\.py::(\w+)", out)))
    return ("CAUGHT" if failed else "MISSED"), failed


def main(selected: list[str]) -> int:
    bad = 0
    for name, file, source, broken in BREAKS:
        if selected and not any(s in name for s in selected):
            continue
        verdict, failed = run_break(name, file, source, broken)
        bad += verdict != "CAUGHT"
        print(f"{verdict:7} {name}: {', '.join(failed) or '-'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
