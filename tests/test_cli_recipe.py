"""Config files that build on a recipe (`recipe: recipe.yaml`): `distill fit --config row.yaml` reads the recipe first.

Also the helpers other tests use to read a config file as `distill fit` does: :func:`distill.cli.config_lines` (the row's
lines over its recipe's, no defaults) and :func:`resolved_config` (``--print_config``, every default filled in).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from conftest import REPO
from distill.cli import config_lines, main, recipe_arguments, recipe_of
from distill.errors import ConfigError

CONFIGS = REPO / "configs"

RECIPE = """\
seed_everything: 3
trainer: {max_epochs: 3}
data: {dataset: fake, batch_size: 16}
model:
  class_path: distill.methods.DistillModule
  init_args:
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.07, momentum: 0.9}}
    lr_scheduler: {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 3}}
"""


# ----------------------------------------------------------------------------------- helpers for other tests
def resolved_config(path: Path, *extra: str) -> dict:
    """``distill fit --config PATH --print_config``, parsed: the config ``distill fit`` would run, defaults included."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), mock.patch.object(sys, "argv", sys.argv[:1]), \
            pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), *extra, "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def config_files() -> tuple[list[Path], set[Path]]:
    """The config files under configs/ (sweep spaces and overlays excluded): the rows, and the recipes they name."""
    files = sorted(p for p in CONFIGS.rglob("*.yaml") if not {"sweeps", "overlays"} & set(p.relative_to(CONFIGS).parts))
    recipes = {recipe.resolve() for recipe in map(recipe_of, files) if recipe is not None}
    return [p for p in files if p.resolve() not in recipes], recipes


# ----------------------------------------------------------------------------------- the recipe include
@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def test_the_recipes_optimizer_reaches_the_rows_method(recipe_dir):
    row = recipe_dir / "row.yaml"
    row.write_text("recipe: recipe.yaml\nmodel:\n  class_path: distill.methods.BaselineKD\n"
                   "  init_args: {student: mlp_small, temperature: 3}\n")
    config = resolved_config(row)
    model = config["model"]
    assert model["class_path"] == "distill.methods.BaselineKD"
    assert model["init_args"]["temperature"] == 3 and model["init_args"]["student"] == "mlp_small"
    assert model["init_args"]["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["init_args"]["optimizer"]["init_args"]["lr"] == 0.07
    assert model["init_args"]["lr_scheduler"]["init_args"]["T_max"] == 3
    assert config["seed_everything"] == 3 and config["trainer"]["max_epochs"] == 3
    assert config["data"]["class_path"] == "distill.data.DistillDataModule"
    assert config["data"]["init_args"]["dataset"] == "fake" and config["data"]["init_args"]["batch_size"] == 16
    assert config["recipe"] == str(recipe_dir / "recipe.yaml")  # the resolved path goes into the saved config


def test_the_rows_values_win_over_the_recipes(recipe_dir):
    row = recipe_dir / "row.yaml"
    row.write_text("recipe: recipe.yaml\ntrainer: {max_epochs: 5}\ndata: {batch_size: 8}\nmodel:\n"
                   "  class_path: distill.methods.Supervised\n"
                   "  init_args: {student: mlp_small, optimizer: {init_args: {lr: 0.01}}}\n")
    config = resolved_config(row)
    optimizer = config["model"]["init_args"]["optimizer"]
    assert optimizer["init_args"]["lr"] == 0.01 and optimizer["init_args"]["momentum"] == 0.9  # merged, not replaced
    data = config["data"]["init_args"]
    assert config["trainer"]["max_epochs"] == 5 and data["batch_size"] == 8
    assert data["dataset"] == "fake" and config["seed_everything"] == 3
    # and the command line wins over both
    assert resolved_config(row, "--trainer.max_epochs=7")["trainer"]["max_epochs"] == 7


def test_a_recipe_next_to_the_row_or_under_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(RECIPE)
    (tmp_path / "rows").mkdir()
    row = tmp_path / "rows" / "row.yaml"
    row.write_text("recipe: recipes/r.yaml\nmodel: {class_path: distill.methods.Supervised, init_args: {student: mlp_small}}\n")
    monkeypatch.chdir(tmp_path)
    assert recipe_arguments(["fit", "--config", str(row)]) == [
        "fit", "--config", "recipes/r.yaml", "--config", str(row), "--recipe", "recipes/r.yaml"]
    assert recipe_arguments(["fit", f"--config={row}", "--trainer.max_epochs=1"]) == [
        "fit", "--config", "recipes/r.yaml", f"--config={row}", "--recipe", "recipes/r.yaml", "--trainer.max_epochs=1"]


def test_a_missing_recipe_is_one_config_error_naming_the_file(tmp_path, capsys):
    row = tmp_path / "row.yaml"
    row.write_text("recipe: nothere.yaml\nmodel: {class_path: distill.methods.Supervised, init_args: {student: mlp_small}}\n")
    with pytest.raises(ConfigError, match="nothere.yaml") as err:
        recipe_arguments(["fit", "--config", str(row)])
    assert str(row) in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(row), "--print_config"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: ") and "nothere.yaml" in lines[0]


def test_sweep_reads_a_row_over_its_recipe(tmp_path):
    from distill.tools.sweep import _read_config

    (tmp_path / "recipe.yaml").write_text("trainer: {default_root_dir: elsewhere, max_epochs: 3}\nrun_name: recipe/name\n")
    row = tmp_path / "row.yaml"
    row.write_text("recipe: recipe.yaml\nrun_name: row/name\ntrainer: {max_epochs: 1}\n")
    config = _read_config(row)
    assert config["run_name"] == "row/name"
    assert config["trainer"] == {"default_root_dir": "elsewhere", "max_epochs": 1}
    row.write_text("recipe: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        _read_config(row)


def test_repro_refuses_an_experiment_whose_config_lacks_its_recipe(tmp_path, monkeypatch):
    from distill.tools.repro import load_spec

    monkeypatch.chdir(tmp_path)
    Path("row.yaml").write_text("recipe: gone.yaml\n")
    Path("exp.yaml").write_text(yaml.safe_dump({"name": "e", "title": "t", "runs": [{"name": "a", "config": "row.yaml"}]}))
    with pytest.raises(ConfigError, match=r"exp.yaml: run 'a': .*gone.yaml"):
        load_spec("exp.yaml")


# ----------------------------------------------------------------------------------- the repository's configs
ROWS, RECIPES = config_files()


def test_every_recipe_is_named_by_a_row_and_holds_only_shared_lines():
    assert {p.name for p in RECIPES} == {"recipe.yaml"} and RECIPES == {
        p.resolve() for p in CONFIGS.rglob("recipe.yaml")}
    shared = {"optimizer", "lr_scheduler", "lr_scheduler_interval", "student_kwargs"}  # what every method accepts
    for recipe in RECIPES:
        text = yaml.safe_load(recipe.read_text())
        assert "recipe" not in text and "run_name" not in text, recipe  # recipes do not chain
        model = text.get("model")
        if model is not None:
            assert model["class_path"] == "distill.methods.DistillModule", recipe
            assert set(model["init_args"]) <= shared, recipe


@pytest.mark.slow
@pytest.mark.parametrize("config", [str(p.relative_to(CONFIGS)) for p in ROWS])
def test_every_config_resolves(config):
    """Every row under configs/ through `distill fit --print_config`, its recipe included (about a second each)."""
    resolved = resolved_config(CONFIGS / config)
    written = config_lines(CONFIGS / config)
    assert resolved["model"]["class_path"] == written["model"]["class_path"]
    assert resolved["run_name"] == written["run_name"]
    assert resolved["trainer"]["max_epochs"] == written["trainer"]["max_epochs"]


def test_no_shipped_config_fixes_its_schedule_to_one_run_length():
    """Every schedule a config names follows the run's length: a cosine without T_max, or epoch numbers with the
    run length they are written for (of_epochs), so `--trainer.max_epochs` or shorter stages decay as the recipe says."""
    fixed = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if path.name.startswith("sweep") or "sweeps" in path.parts:
            continue
        scheduler = ((config_lines(path).get("model") or {}).get("init_args") or {}).get("lr_scheduler")
        if not scheduler:
            continue
        class_path, init_args = scheduler.get("class_path"), scheduler.get("init_args") or {}
        follows = (class_path in ("distill.optim.MultiStep", "distill.optim.CosineAnnealing")
                   and ("T_max" not in init_args and "milestones" not in init_args or init_args.get("of_epochs"))) \
            or (class_path in ("distill.optim.WarmupCosine", "distill.optim.OneCycle") and "total_steps" not in init_args)
        if not follows:
            fixed.append(f"{path.relative_to(CONFIGS)}: {class_path} {init_args}")
    assert not fixed, "schedules of one fixed length:\n" + "\n".join(fixed)


def test_the_gpu_overlay_adds_its_options_and_keeps_the_experiments_callbacks():
    """configs/overlays/gpu.yaml after an experiment: bf16, device-resident data, SpeedOptions appended to the
    experiment's own callbacks (EvalTeacherCache stays), the method and recipe unchanged."""
    row = CONFIGS / "cifar10_jpeg" / "takd" / "kd_cnn10_cnn2.yaml"
    plain, gpu = resolved_config(row), resolved_config(row, "--config", str(CONFIGS / "overlays" / "gpu.yaml"))
    assert gpu["trainer"]["precision"] == "bf16-mixed"
    data = gpu["data"]["init_args"]
    assert data["device_resident"] is True and data["num_workers"] == 0
    assert [c["class_path"] for c in gpu["trainer"]["callbacks"]] == [
        *(c["class_path"] for c in plain["trainer"]["callbacks"]), "distill.callbacks.SpeedOptions"]
    assert "distill.callbacks.EvalTeacherCache" in [c["class_path"] for c in gpu["trainer"]["callbacks"]]
    assert gpu["trainer"]["callbacks"][-1]["init_args"] == {"channels_last": True, "compile": "reduce-overhead",
                                                           "fused_optimizer": True}
    assert gpu["model"] == plain["model"] and gpu["trainer"]["max_epochs"] == plain["trainer"]["max_epochs"]
