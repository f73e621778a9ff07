"""Install the CNI executable into a CNI bin dir: the compiled forwarder
(cni_plugin/native, built by scripts/build-shim) with this installation's Python
launcher beside it for when no agent runs, or the Python launcher alone."""
from __future__ import annotations

import sys
from pathlib import Path

from runtime.fsutil import atomic_write

CNI_NAME = "sockgate"
# What the compiled executable runs when no agent answers (cni_plugin/native: the
# name is compiled in). A second file in a bin dir other plugins share, but the only
# way a static binary can find "the Python installation" without configuration.
PYTHON_LAUNCHER = "sockgate-python"
SHIMS = ("auto", "compiled", "python")
# The directory holding the packages `runtime` and `cni_plugin` (the shim the launcher
# runs): found from here, since the runtime never imports the CNI executable's package.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
COMPILED_SHIM = SOURCE_ROOT / "build" / "sockgate-cni"


class NotBuilt(Exception):
    """--shim compiled, and scripts/build-shim has not built it."""


def cni_launcher(python: str = sys.executable) -> str:
    """-IS (one shebang argument): -I, no user site-packages or PYTHON* variables of the runtime's environment
    change what the plugin imports. -S: no site-packages scan at start-up (the shim
    adds it only when it runs the request in-process), so the path to this
    installation's sources is set here."""
    return (f"#!{python} -IS\nimport sys\nsys.path.insert(0, {str(SOURCE_ROOT)!r})\n"
            "from cni_plugin.shim import main\nraise SystemExit(main())\n")


def compiled_available() -> bool:
    return COMPILED_SHIM.is_file()


def install_cni(bin_dir: str, name: str = CNI_NAME, shim: str = "auto") -> Path:
    """Atomically place the executable, so a runtime calling the plugin during an
    upgrade runs either the old or the new one. `shim`: "compiled" (the static
    forwarder; NotBuilt if it isn't), "python" (the launcher alone, as before the
    compiled one existed), "auto" (compiled when built)."""
    if shim not in SHIMS:
        raise ValueError(f"shim must be one of {', '.join(SHIMS)}, not {shim!r}")
    directory = Path(bin_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    compiled = shim == "compiled" or (shim == "auto" and compiled_available())
    if compiled and not compiled_available():
        raise NotBuilt(f"{COMPILED_SHIM} is not built (scripts/build-shim builds it)")
    # Through one temp name per target (`.sockgate.tmp`): what an install killed
    # mid-write leaves is removed by the next install (runtime.fsutil), not left in a
    # bin dir other plugins share. The launcher first: the compiled executable looks
    # for it only when no agent answers.
    launcher = cni_launcher().encode()
    if compiled:
        atomic_write(directory / PYTHON_LAUNCHER, launcher, durable=False, mode=0o755)
        atomic_write(target, COMPILED_SHIM.read_bytes(), durable=False, mode=0o755)
    else:
        atomic_write(target, launcher, durable=False, mode=0o755)
        # A compiled install's fallback launcher has no caller any more.
        (directory / PYTHON_LAUNCHER).unlink(missing_ok=True)
    return target
