"""The README's `distill fit` commands parse as written (each was also run for real when the README last changed)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest
import yaml

from conftest import REPO


def readme_fit_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = [block.replace("\\\n", " ") for block in blocks]  # a command continued on the next line
    lines = [line.split("  #")[0].strip() for block in joined for line in block.splitlines()]
    return [line for line in lines if line.startswith("distill fit ")]


def test_the_readme_shows_fit_commands():
    assert len(readme_fit_commands()) >= 5


@pytest.mark.parametrize("command", readme_fit_commands())
def test_a_readme_fit_command_resolves_to_a_config(command, monkeypatch):
    from distill.cli import main

    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    args = [arg for arg in shlex.split(command)[1:] if arg != "--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    config = yaml.safe_load(out.getvalue())
    assert config["model"]["class_path"].startswith("distill.methods.") and config["data"]["class_path"]
