"""`make demo` end to end, shortened to one epoch per run."""

from distill.tools import demo


def test_demo_prints_table_and_tensorboard_command(capsys):
    demo.main(["--trainer.max_epochs=1", "--trainer.limit_train_batches=5"])
    out = capsys.readouterr().out
    for row in ("teacher", "student, from scratch", "student, BaselineKD"):
        assert row in out
    assert "KD gain over scratch" in out
    assert "tensorboard --logdir runs/mnist5k" in out
