"""`make demo` end to end, shortened to one epoch per run."""

from distill.tools import demo


def test_demo_prints_table_gains_per_seed_and_tensorboard_command(capsys):
    runs = demo.main(["--seeds", "0", "3", "--trainer.max_epochs=1", "--trainer.limit_train_batches=5"])
    out = capsys.readouterr().out
    for row in ("teacher", "student, from scratch", "student, BaselineKD"):
        assert row in out
    assert [r["seed"] for r in runs["teacher"]] == [0]
    assert [r["seed"] for r in runs["scratch"]] == [r["seed"] for r in runs["kd"]] == [0, 3]
    assert all(r["teacher"]["path"] == runs["teacher"][0]["model_file"] for r in runs["kd"])
    gains = [100 * (kd["test_acc"] - scratch["test_acc"]) for scratch, kd in zip(runs["scratch"], runs["kd"])]
    line = next(line for line in out.splitlines() if line.startswith("KD gain over scratch"))
    assert line.endswith(f"seed by seed: {gains[0]:+.1f}, {gains[1]:+.1f} (mean {(gains[0] + gains[1]) / 2:+.2f}; "
                         f"KD better in {sum(g > 0 for g in gains)} of 2)")
    assert "tensorboard --logdir runs/mnist5k" in out
