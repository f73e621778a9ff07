"""The node's egress policy at run time: the policy file read, and compiled with the
Google ranges cache (runtime.core.ranges), once per change of either in a serving
process (CompiledPolicies). netpolicy/ decides; this module reads files. Loading the
compiled table: runtime.core.table."""
from __future__ import annotations

import json
from pathlib import Path

from netpolicy.compile import Compiled, compile_policy
from netpolicy.policy import Policy, PolicyError, parse_policy
from runtime.core.ranges import load_ranges, ranges_cache
from runtime.errors import INVALID_CONFIG, IO_FAILURE, SockgateError
from runtime.fsutil import file_stamp


def load_policy(path: str) -> Policy:
    """A missing file means the default contract; a broken one is an error naming the
    field, and nothing is applied."""
    try:
        raw = Path(path).read_text()
    except FileNotFoundError:
        return Policy()
    except OSError as exc:
        raise SockgateError(IO_FAILURE, f"cannot read policy file {path}", exc.strerror or str(exc)) from None
    try:
        return parse_policy(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise SockgateError(INVALID_CONFIG, f"policy file {path} is not valid JSON", str(exc)) from None
    except PolicyError as exc:
        raise SockgateError(INVALID_CONFIG, f"invalid policy file {path}: {exc}", exc.field) from None


def resolved_record(state_dir: str) -> Path:
    return Path(state_dir) / "policy" / "resolved.json"


def compiled(policy_file: str, state_dir: str) -> Compiled:
    """The policy compiled now (a one-shot command); a serving process goes through
    its Node's CompiledPolicies."""
    policy = load_policy(policy_file)
    return compile_policy(policy, load_ranges(policy, state_dir))


class CompiledPolicies:
    """The last compiled policy of a process, valid until the policy file or the ranges
    cache changes: the agent compiles once per change, not on every ADD (compiling
    takes ~15 ms; checking two stats takes microseconds)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], Compiled] = {}

    def get(self, policy_file: str, state_dir: str) -> Compiled:
        key = (policy_file, state_dir, file_stamp(Path(policy_file)), file_stamp(ranges_cache(state_dir)))
        if key[3] is not None and key in self._cache:
            return self._cache[key]
        result = compiled(policy_file, state_dir)
        self._cache.clear()
        self._cache[key] = result
        return result
