"""Run one sockgate entry point with a function wrapped so that the process SIGKILLs
itself just before or just after the real call: kill -9 at an exact moment, for
tests/test_kill.py. Run as a script, inside the netns (and mount ns) wanted:

    python tests/support/kill_at.py SPEC_JSON

SPEC: {"patches": [{"target": "module:attr[.attr]", "when": "before"|"after", "nth": 1}],
       "prelude": "python code run first (a kill point inside a function; `die(label)`)",
       "run": {"kind": "cni", "env": {...}, "stdin": "..."} | {"kind": "cli", "argv": [...]}}
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def die(label: str) -> None:
    sys.stderr.write(f"KILLED {label}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch(target: str, when: str, nth: int) -> None:
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    raw = owner.__dict__.get(name) if hasattr(owner, "__dict__") else None
    static = isinstance(raw, staticmethod)
    real = raw.__func__ if static else getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            die(f"before {target}")
        result = real(*args, **kwargs)
        if calls[0] == nth and when == "after":
            die(f"after {target}")
        return result
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def main() -> int:
    spec = json.loads(sys.argv[1])
    for p in spec.get("patches", []):
        patch(p["target"], p.get("when", "before"), p.get("nth", 1))
    if spec.get("prelude"):
        exec(spec["prelude"], {"die": die})
    run = spec["run"]
    if run["kind"] == "cni":
        from runtime.cni.entry import execute
        rc, out = execute(run["env"], run["stdin"].encode())
        sys.stdout.write(out)
        return rc
    from runtime.cli.main import main as cli
    return cli(run["argv"])


if __name__ == "__main__":
    sys.exit(main())
