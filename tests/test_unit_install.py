"""`sockgate install-cni --shim auto|compiled|python` into a temporary bin dir (no root):
which files it writes, that the compiled one is a static executable, and what it says
when the compiled one isn't built."""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from runtime.cli import install
from runtime.cli.main import main

PT_INTERP = 3


def program_header_types(path: Path) -> list[int]:
    """p_type of every program header of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, e_phoff + i * e_phentsize)[0] for i in range(e_phnum)]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["install-cni", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("shim", ["compiled", "auto"])
def test_compiled_writes_the_executable_and_the_launcher(tmp_path: Path, capsys, shim: str) -> None:
    assert install.compiled_available(), "scripts/setup builds build/sockgate-cni"
    rc, out, err = run(capsys, "--bin-dir", str(tmp_path), "--shim", shim)
    assert rc == 0 and err == "", err
    assert sorted(os.listdir(tmp_path)) == ["sockgate", "sockgate-python"]
    exe = tmp_path / "sockgate"
    assert f"installed CNI plugin at {exe} (compiled), with sockgate-python beside it" in out
    assert exe.read_bytes() == install.COMPILED_SHIM.read_bytes() and os.access(exe, os.X_OK)
    # Static: no program interpreter (no loader, no libc on the node).
    types = program_header_types(exe)
    assert types and PT_INTERP not in types, types
    described = subprocess.run(["file", "-b", str(exe)], capture_output=True, text=True, timeout=10).stdout
    assert "statically linked" in described and "interpreter" not in described, described
    launcher = (tmp_path / "sockgate-python").read_text()
    assert launcher == install.cni_launcher() and os.access(tmp_path / "sockgate-python", os.X_OK)


def test_python_writes_only_the_launcher(tmp_path: Path, capsys) -> None:
    rc, out, err = run(capsys, "--bin-dir", str(tmp_path), "--shim", "python")
    assert rc == 0 and err == "", err
    assert os.listdir(tmp_path) == ["sockgate"] and "(Python launcher)" in out
    assert (tmp_path / "sockgate").read_text() == install.cni_launcher()


def test_not_built(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(install, "COMPILED_SHIM", tmp_path / "build" / "sockgate-cni")
    bin_dir = tmp_path / "bin"
    # compiled: an error naming what to run, nothing written.
    rc, out, err = run(capsys, "--bin-dir", str(bin_dir), "--shim", "compiled")
    assert rc == 1 and out == ""
    assert err.startswith("sockgate install-cni: error: ") and "scripts/build-shim" in err, err
    assert not bin_dir.exists() or os.listdir(bin_dir) == []
    # auto: the launcher, saying why.
    rc, out, err = run(capsys, "--bin-dir", str(bin_dir), "--shim", "auto")
    assert rc == 0 and "(Python launcher)" in out
    assert "compiled CNI executable is not built" in err and "scripts/build-shim" in err, err
    assert os.listdir(bin_dir) == ["sockgate"]
    assert (bin_dir / "sockgate").read_text() == install.cni_launcher()
