"""The `sockgate` command line itself (its subcommands are tested where they act)."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest

from runtime.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "deploy" / "systemd" / "policy.json"


def test_version_is_the_one_setup_cfg_declares(capsys):
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sockgate {cfg['metadata']['version']}"


# ---- errors: one line naming the command and what failed, exit status 1 -----------------

def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_policy_check_of_a_missing_file_fails_naming_it(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    rc, out, err = _run(capsys, "policy", "check", "--policy", str(missing))
    assert rc == 1 and out == ""
    assert err.startswith(f"sockgate policy check: error: no policy file {missing}") and err.count("\n") == 1


def test_policy_check_json(capsys, tmp_path):
    rc, out, _ = _run(capsys, "policy", "check", "--policy", str(DEFAULT_POLICY), "--json")
    assert rc == 0
    default = json.loads(out)
    assert default["valid"] is True and default["policy"] == str(DEFAULT_POLICY)
    more = tmp_path / "more.json"
    more.write_text(json.dumps({"blockedPorts": [{"protocol": "tcp", "port": 8025}]}))
    rc, out, _ = _run(capsys, "policy", "check", "--policy", str(more), "--json")
    assert rc == 0 and json.loads(out)["blocked_ports"] == default["blocked_ports"] + 1


@pytest.mark.parametrize("case", ["seccomp output dir missing", "install-cni under a file", "billing file a dir"])
def test_an_os_error_is_one_line_naming_the_command_and_file(capsys, tmp_path, case):
    (tmp_path / "file").write_text("")
    if case == "seccomp output dir missing":
        argv, command, detail = (["seccomp", "generate", "-o", str(tmp_path / "no" / "x.json")], "seccomp generate",
                                 f"No such file or directory: {tmp_path / 'no'}/")
    elif case == "install-cni under a file":
        argv, command, detail = (["install-cni", "--bin-dir", str(tmp_path / "file" / "bin"), "--shim", "python"],
                                 "install-cni", f"Not a directory: {tmp_path / 'file' / 'bin'}")
    else:
        (tmp_path / "billing" / "billing.jsonl").mkdir(parents=True)
        argv, command, detail = ["billing", "report", "--dir", str(tmp_path / "billing")], "billing report", "Is a directory"
    rc, out, err = _run(capsys, *argv)
    assert rc == 1 and out == ""
    assert err.startswith(f"sockgate {command}: error: {detail}"), err
    assert err.count("\n") == 1 and "Traceback" not in err and "[Errno" not in err


@pytest.mark.parametrize("argv", [["seccomp", "generate"],                     # larger than stdout's buffer
                                  ["policy", "check", "--policy", str(DEFAULT_POLICY)]])  # a line
def test_a_reader_that_went_away_gets_no_traceback(argv):
    """`sockgate … | head -c0`: the pipe's reader is gone before the output is
    written (or flushed); the command ends quietly with status 1."""
    import os
    import subprocess
    import sys
    # Buffered, as stdout to a pipe is by default: the short output leaves at the flush.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child can write a byte
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 1 and err == ""


# ---- --json wherever a command prints a table or a summary -----------------------------

def test_ranges_update_and_policy_explain_json(capsys, tmp_path):
    from runtime.lab import LAB
    from runtime.lab.policy import write_lab_policy
    policy = str(write_lab_policy(tmp_path / "policy.json"))
    state = str(tmp_path / "state")
    rc, out, _ = _run(capsys, "ranges", "update", "--policy", policy, "--state-dir", state, "--json")
    assert rc == 0
    ranges = json.loads(out)
    assert ranges["ipv4"] > 0 and ranges["ipv6"] > 0 and Path(ranges["cache"]).is_file()
    assert set(ranges["sources"]) == {"goog", "cloud"}
    common = ["--pool", "10.77.0.0/16", "--policy", policy, "--state-dir", state, "--json"]
    rc, out, _ = _run(capsys, "policy", "explain", LAB.google_v4, "443", "tcp", *common)
    refused = json.loads(out)
    assert rc == 3 and refused["verdict"] == "refuse" and refused["rule"] == "blocked-range", refused
    assert "Google" in refused["why"] + refused["detail"], refused
    assert refused["destination"] == LAB.google_v4 and refused["port"] == 443 and refused["protocol"] == "tcp"
    rc, out, _ = _run(capsys, "policy", "explain", LAB.cloud_v4, "443", "tcp", *common)
    assert rc == 0 and json.loads(out)["verdict"] == "accept"


def test_refresh_json_needs_once(capsys):
    rc, out, err = _run(capsys, "policy", "refresh", "--json")
    assert rc == 2 and out == "" and "--json needs --once" in err
