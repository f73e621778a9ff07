"""What share of one CPU's time sockgate's hooks take, from `perf` samples
(bench-dataplane --profile): 1 - share estimates the throughput ratio.

Which samples count and why: docs/benchmarks.md.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FORWARD_CALLERS = ("ip_forward", "ip6_forward")
PREROUTING_CALLERS = ("ip_rcv", "ipv6_rcv")
HOOK = "nf_hook_slow"
NFT_INET = "nft_do_chain_inet"
# The segment meter's program, as perf names its JIT image (bpf_prog_<tag>_<name>).
METER = "_sg_segments"
# What calls a netfilter BPF program: at prerouting in the bench's node netns, only the
# meter's.
BPF_HOOK = "nf_hook_run_bpf"
# A sample whose stack holds one of these is the CPU idling.
IDLE_FRAMES = ("do_idle", "cpu_idle_poll", "default_idle_call")


class ProfileError(Exception):
    """perf is missing or recorded nothing."""


@dataclass(frozen=True)
class HookShare:
    samples: int        # all samples of the CPU
    in_hook: int        # inside sockgate's hooks (forward, prerouting's nft chain and meter)
    idle: int           # the CPU idling
    in_prerouting: int = 0  # of in_hook: the prerouting chain
    in_meter: int = 0       # of in_hook: the segment meter's program, at both hooks

    @property
    def share(self) -> float:
        return self.in_hook / self.samples if self.samples else 0.0

    @property
    def busy(self) -> float:
        return 1 - self.idle / self.samples if self.samples else 0.0


def _stacks(script_output: str) -> list[list[str]]:
    """`perf script -F ip,sym` output: one block per sample, a frame per line
    ("ADDRESS SYMBOL"), innermost first, blocks separated by blank lines."""
    stacks = []
    for block in script_output.split("\n\n"):
        frames = [parts[1] if len(parts) > 1 else "?"
                  for parts in (line.split() for line in block.strip().splitlines()) if parts]
        if frames:
            stacks.append(frames)
    return stacks


def _in_prerouting_chain(frames: list[str]) -> bool:
    return any(a == NFT_INET and b == HOOK and c in PREROUTING_CALLERS
               for a, b, c in zip(frames, frames[1:], frames[2:]))


def _in_meter(frames: list[str]) -> bool:
    return any(f.endswith(METER) and f.startswith("bpf_prog_") for f in frames)


def _in_meter_hook_at_prerouting(frames: list[str]) -> bool:
    """The call into the meter's program at prerouting (the forward hook's is counted
    with the hook)."""
    return any(a == BPF_HOOK and b == HOOK and c in PREROUTING_CALLERS
               for a, b, c in zip(frames, frames[1:], frames[2:]))


def forward_hook_share(script_output: str) -> HookShare:
    in_hook = in_pre = in_meter = idle = 0
    stacks = _stacks(script_output)
    for frames in stacks:
        meter = _in_meter(frames)
        if any(f in IDLE_FRAMES for f in frames):
            idle += 1
        elif any(f == HOOK and caller in FORWARD_CALLERS for f, caller in zip(frames, frames[1:])):
            in_hook += 1
            in_meter += meter
        elif meter or _in_meter_hook_at_prerouting(frames):
            # A sample inside the program's JIT image mostly has no hook frames: perf
            # often can't unwind out of it, and goes on with the user stack. Counted
            # only under a hook, 6 in 10 of the meter's samples were lost (tenth
            # session, docs/measurements.md).
            in_hook += 1
            in_meter += 1
        elif _in_prerouting_chain(frames):
            in_hook += 1
            in_pre += 1
    return HookShare(len(stacks), in_hook, idle, in_pre, in_meter)


def available() -> bool:
    return shutil.which("perf") is not None


def record(cpu: int, seconds: float, out: Path) -> HookShare:
    """Sample `cpu` (call graphs) for `seconds`; perf runs in the caller's netns but
    samples the whole CPU, whichever netns its work is for."""
    rec = subprocess.run(["perf", "record", "-q", "-C", str(cpu), "-g", "-o", str(out), "--",
                          "sleep", str(seconds)], capture_output=True, text=True)
    if rec.returncode != 0:
        raise ProfileError(f"perf record failed: {rec.stderr.strip()[-300:]}")
    script = subprocess.run(["perf", "script", "-i", str(out), "-F", "ip,sym"], capture_output=True, text=True)
    if script.returncode != 0:
        raise ProfileError(f"perf script failed: {script.stderr.strip()[-300:]}")
    got = forward_hook_share(script.stdout)
    if got.samples == 0:
        raise ProfileError(f"perf recorded no samples on CPU {cpu}")
    return got
