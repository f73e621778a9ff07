"""Install the CNI executable into a CNI bin dir."""
from __future__ import annotations

import sys
from pathlib import Path

from runtime.fsutil import atomic_write

CNI_NAME = "sockgate"
# The directory holding the packages `runtime` and `cni_plugin` (the shim the launcher
# runs): found from here, since the runtime never imports the CNI executable's package.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def cni_launcher(python: str = sys.executable) -> str:
    """-IS (one shebang argument): -I, no user site-packages or PYTHON* variables of the runtime's environment
    change what the plugin imports. -S: no site-packages scan at start-up (the shim
    adds it only when it runs the request in-process), so the path to this
    installation's sources is set here."""
    return (f"#!{python} -IS\nimport sys\nsys.path.insert(0, {str(SOURCE_ROOT)!r})\n"
            "from cni_plugin.shim import main\nraise SystemExit(main())\n")


def install_cni(bin_dir: str, name: str = CNI_NAME) -> Path:
    """Atomically place the executable, so a runtime calling the plugin during an
    upgrade runs either the old or the new one."""
    directory = Path(bin_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    # Through one temp name (`.sockgate.tmp`): what an install killed mid-write
    # leaves is removed by the next install (runtime.fsutil), not left in a bin dir
    # other plugins share.
    atomic_write(target, cni_launcher().encode(), durable=False, mode=0o755)
    return target
