"""The README's demo command works and cleans up after itself."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab


def test_demo_runs_and_leaves_nothing():
    proc = subprocess.run([sys.executable, "-m", "runtime.cli.main", "demo"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks as expected" in proc.stdout
    assert proc.stdout.count(" ok") >= 12 and "MISMATCH" not in proc.stdout
    prefix = proc.stdout.split()[1].rstrip(":")  # "lab sgl-xxxxxx: ..."
    assert prefix.startswith("sgl-")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in left
