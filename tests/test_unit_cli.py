"""The `sockgate` command line itself (its subcommands are tested where they act)."""
from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from runtime.cli.main import build_parser


def test_version_is_the_one_setup_cfg_declares(capsys):
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sockgate {cfg['metadata']['version']}"
