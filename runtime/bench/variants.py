"""bench-dataplane --variants FILE: what a change to sockgate's table would cost, told
apart to a few tenths of a per cent.

iperf3's rates drift by several per cent within seconds on a shared VM, so the A/B
run can't see a change of one point (docs/measurements.md). The profile can: with the
sender's CPU saturated, the share of its samples inside sockgate's hooks is what
sockgate costs a packet (runtime/bench/profile.py). This mode profiles config B as it
is ("sockgate") and B with each variant's nft commands applied on top, interleaved:
every round profiles every variant once, in an order rotated from round to round,
so that drift and order spread over all of them alike. Method: docs/benchmarks.md.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from runtime import textable
from runtime.bench import report

if TYPE_CHECKING:
    from netpolicy.ruleset import Endpoint
    from runtime.bench.dataplane import Test

AS_IS = "sockgate"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_SECTION = re.compile(r"\[(.*)\]")
# Below this busy share the sending CPU idled: the traffic stalled, and the round's
# share of samples says nothing of a packet's cost.
SATURATED = 0.9


class VariantsError(ValueError):
    """The variants file can't be used; the message names the line."""


@dataclass(frozen=True)
class Variant:
    name: str
    commands: tuple[str, ...]    # nft commands, one per line, applied in one transaction

    @property
    def script(self) -> str:
        return "".join(c + "\n" for c in self.commands)


_MEASURED = ("measured_iif", "measured_ipv4", "measured_ipv6")


def with_measured(measured: Endpoint, script: str) -> str:
    """A variant's commands with nft variables for the measured container: a rule for
    it alone (its own chain, a map element) needs its host veth and addresses, which
    are known only once the lab is up, so a variant writes `$measured_iif`,
    `$measured_ipv4`, `$measured_ipv6`. libnftables keeps variables in its context,
    which the whole process shares: `redefine` works whether or not an earlier
    script left them, and the trailing `undefine` leaves nothing for the next one."""
    values = (f'"{measured.host_ifname}"', measured.ipv4, measured.ipv6)
    return ("".join(f"redefine {n} = {v}\n" for n, v in zip(_MEASURED, values)) + script
            + "".join(f"undefine {n}\n" for n in _MEASURED))


def parse_variants(text: str, source: str = "variants file") -> list[Variant]:
    """`[name]` lines, each followed by the nft commands of that variant (none: B as
    it is, a second time, which gauges the noise); blank lines and `#` comments are
    skipped."""
    variants: list[tuple[str, list[str]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION.fullmatch(line)
        if section:
            name = section.group(1).strip()
            if not _NAME.fullmatch(name):
                raise VariantsError(f"{source}, line {number}: variant name {name!r}: use 1-40 of a-z, 0-9, "
                                    "'-', '_', starting with a letter or digit")
            if name == AS_IS or name in (n for n, _ in variants):
                raise VariantsError(f"{source}, line {number}: variant name {name!r} is taken"
                                    + (" (config B as it is)" if name == AS_IS else ""))
            variants.append((name, []))
        elif not variants:
            raise VariantsError(f"{source}, line {number}: an nft command before the first [name] line")
        else:
            variants[-1][1].append(line)
    if not variants:
        raise VariantsError(f"{source}: no variant (a [name] line followed by nft commands)")
    return [Variant(name, tuple(commands)) for name, commands in variants]


def rotated(names: list[str], round_no: int) -> list[str]:
    """The order of round `round_no`: each variant takes every position in turn."""
    k = round_no % len(names)
    return names[k:] + names[:k]


@dataclass
class Shares:
    """One variant's profiles of one metric, a value per round."""

    hooks: list[float] = field(default_factory=list)        # share of samples in sockgate's hooks
    prerouting: list[float] = field(default_factory=list)   # of which the prerouting chain
    busy: list[float] = field(default_factory=list)         # the CPU's busy share
    sent: list[str] = field(default_factory=list)           # what the container sent meanwhile

    def add(self, test: Test, profile: dict[str, Any]) -> None:
        n = profile["samples"] or 1
        self.hooks.append(profile["hook_share"])
        self.prerouting.append(profile["in_prerouting_chain"] / n)
        self.busy.append(profile["cpu_busy"])
        self.sent.append(rate(test, profile))


def rate(test: Test, profile: dict[str, Any]) -> str:
    """What the measured container sent during a profile, in the metric's unit."""
    if "sent_bps" not in profile:
        return "?"
    return (f"{profile['sent_bps'] / 1e9:.1f} Gbit/s" if test.proto == "tcp"
            else f"{profile['sent_pps'] / 1e3:.0f} kpps")


def run_rounds(tests: list[Test], names: list[str], rounds: int,
               profile: Callable[[Test, str], dict[str, Any]]) -> dict[str, dict[str, Shares]]:
    """profile(test, variant) for every round, metric and variant: {metric: {variant: Shares}}."""
    out: dict[str, dict[str, Shares]] = {t.key: {n: Shares() for n in names} for t in tests}
    for t in tests:
        for r in range(rounds):
            for name in rotated(names, r):
                out[t.key][name].add(t, profile(t, name))
    return out


def summarize(shares: dict[str, dict[str, Shares]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians per metric and variant, and each variant's difference from B as it is
    (in points of the CPU's samples; negative: the variant costs less)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, by_variant in shares.items():
        base = statistics.median(by_variant[AS_IS].hooks)
        out[key] = {}
        for name, s in by_variant.items():
            med = statistics.median(s.hooks)
            out[key][name] = {"hooks": med, "prerouting": statistics.median(s.prerouting),
                              "busy_min": min(s.busy), "rounds": list(s.hooks), "sent": list(s.sent),
                              "vs_sockgate": med - base, "expected_ratio": 1 - med}
    return out


def report_lines(tests: list[Test], summary: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    """Table rows: metric, variant, median share, prerouting, difference, every round."""
    rows = []
    for t in tests:
        for i, (name, s) in enumerate(summary[t.key].items()):
            rows.append([t.label if i == 0 else "", name, f"{100 * s['hooks']:.2f} %",
                         f"{100 * s['prerouting']:.2f} %",
                         "" if name == AS_IS else f"{100 * s['vs_sockgate']:+.2f}",
                         f"{s['expected_ratio']:.3f}",
                         " ".join(f"{100 * v:.2f} ({r})" for v, r in zip(s["rounds"], s["sent"]))
                         + ("  (CPU not saturated)" if s["busy_min"] < SATURATED else "")])
    return rows


def print_report(rep: dict[str, Any], tests: list[Test]) -> None:
    a = rep["args"]
    print(f"sockgate data-plane variants: lab {rep['lab']}, {rep['cpus']} CPUs, kernel {rep['kernel']}")
    print(f"config B {AS_IS}: {rep['policy']}; {a['containers']} containers ({a['fill']})")
    for name, commands in rep["variants"].items():
        print(f"  variant {name}: B, then " + ("; ".join(commands) if commands else "nothing (B again)"))
    print(f"each round profiles every variant once, in an order rotated from round to round: {a['rounds']} "
          f"rounds of {a['profile_s']:.0f} s of perf on the sending CPU per variant and metric "
          f"(TCP CPUs {report.pinning(a['tcp_cpus'])}, UDP CPUs {report.pinning(a['udp_cpus'])})")
    print()
    head = ["metric", "variant", "hooks", "prerouting", "vs B", "expected", "every round: % (sending)"]
    print(textable.render(head, report_lines(tests, rep["summary"]), left=(0, 1, 6)))
    print()
    print("hooks: median share of the CPU's samples inside sockgate's hooks (forward, and the prerouting "
          "chain); vs B: its\ndifference from B as it is, in points; expected: 1 - hooks, the iperf3 ratio "
          "it predicts;\nsending: what the container sent during the round's profile. Shares compare only "
          "between rounds at like rates:\na TCP connection runs at one of two (15 or 38 Gbit/s on the machine of "
          "2026-12-08), whatever the variant")
    print(f"took {rep['seconds']:.0f} s")
