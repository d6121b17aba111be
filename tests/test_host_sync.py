"""The training loop never waits for the device: no host read of a tensor in the steady-state step (issue 20).

On a GPU every ``.item()``, ``bool(tensor)`` or ``.cpu()`` waits for all the work queued before it, so a loop
that reads one value per step can never run ahead of the device. These tests run every method through
``distill fit`` on the CPU with the progress bar on and catch the reads in Python (a GPU run can add
``torch.cuda.set_sync_debug_mode("error")``: ``python -m distill.tools.bench --gpu-suite`` does).
"""

from __future__ import annotations

import pytest
import yaml

from distill.methods import METHODS
from distill.reliability import nonfinite
from distill.tools import killtest
from distill.tools.main import main
from reliability_helpers import NoHostReads


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
