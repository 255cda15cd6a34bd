"""The `facelab` command: train reaches the method registry, errors are plain, pending commands say so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from facelab.cli import main


def test_train_composes_the_config_and_says_the_method_is_not_available_yet(capsys):
    assert main(["train", "method=cest", "trainer.max_steps=5"]) == 3
    assert "method 'cest' is not available yet" in capsys.readouterr().err


def test_train_print_config_shows_resolved_overrides(capsys):
    assert main(["train", "--print-config", "method=cest", "trainer.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "name: cest" in out and "max_steps: 7" in out


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_step=5", "did you mean 'trainer.max_steps'"),
    ("method=specualr", "valid choices: specular"),
])
def test_train_typos_fail_listing_valid_names(capsys, override, expected):
    assert main(["train", override]) == 2
    assert expected in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    for command in ("train", "eval", "reconstruct", "data", "assets", "bench"):
        assert command in listed


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "facelab.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("facelab ")
