"""Docker's firewall next to ours: the agent keeps ACCEPT rules for sockgate's veths
where dockerd's iptables FORWARD policy would drop them; our own drops still apply.

Design notes: docs/docker.md.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from typing import Callable

log = logging.getLogger("sockgate.docker")
FIREWALL_EVERY_S = 5.0

_RULE_COMMENT = "sockgate: veths policed by table inet sockgate"
_RULES = (("-i", "sg+"), ("-o", "sg+"))


class ForwardAccept:
    """Lets sockgate's veths through iptables' FORWARD where Docker's firewall would
    drop them (Docker sets the FORWARD policy to DROP when it turns on forwarding).

    Both iptables backends are looked at, each with its own tool, since which one
    Docker uses depends on the `iptables` on *its* PATH: the nft backend with
    iptables-nft (whose tables are nft tables: `ip filter`, `ip6 filter`), the legacy
    backend with iptables-legacy, only when the legacy filter table already exists in
    this netns (/proc/net/ip{,6}_tables_names), so that looking never creates one.
    python-iptables (libiptc) is not used: it drives only the legacy backend (on an
    nft host it sees empty chains) and doesn't take the xtables lock, so a commit
    racing dockerd's own iptables calls could lose either side's rules.

    Where the rules go, per backend and family: the DOCKER-USER chain when it exists
    (Docker jumps there first and never flushes it); else, when the FORWARD policy is
    DROP (dockerd 20.10 creates no DOCKER-USER for IPv6), the top of FORWARD. They
    accept packets from and to `sg+` interfaces; the `inet sockgate` table still sees
    every such packet on its own forward hook, and its drop is final whatever
    iptables accepted. Rules stay when the agent stops (running containers keep
    working); `ensure()` runs every few seconds and before each Join."""

    TOOLS = (("nft", 4, "iptables-nft"), ("nft", 6, "ip6tables-nft"),
             ("legacy", 4, "iptables-legacy"), ("legacy", 6, "ip6tables-legacy"))

    def __init__(self, run: Callable[[list[str]], subprocess.CompletedProcess] | None = None) -> None:
        self._run = run or (lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=20))
        self._lock = threading.Lock()
        self._checked = 0.0
        self.placed: dict[str, str] = {}   # "nft/4" -> chain holding our rules

    @staticmethod
    def _legacy_table_exists(family: int) -> bool:
        path = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
        try:
            with open(path) as fh:
                return "filter" in fh.read().split()
        except OSError:
            return False

    def _chain(self, tool: str) -> str | None:
        if self._run([tool, "-w", "5", "-S", "DOCKER-USER"]).returncode == 0:
            return "DOCKER-USER"
        head = self._run([tool, "-w", "5", "-S", "FORWARD"])
        if head.returncode == 0 and "-P FORWARD DROP" in head.stdout.splitlines()[:1]:
            return "FORWARD"
        return None

    def ensure(self, max_age: float = 0.0) -> dict[str, str]:
        with self._lock:
            if max_age and time.monotonic() - self._checked < max_age:
                return dict(self.placed)
            placed = {}
            for backend, family, name in self.TOOLS:
                if backend == "legacy" and not self._legacy_table_exists(family):
                    continue
                tool = shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
                if tool is None:
                    continue
                chain = self._chain(tool)
                if chain is None:
                    continue
                for match in reversed(_RULES):
                    spec = [*match, "-m", "comment", "--comment", _RULE_COMMENT, "-j", "ACCEPT"]
                    if self._run([tool, "-w", "5", "-C", chain, *spec]).returncode != 0:
                        done = self._run([tool, "-w", "5", "-I", chain, "1", *spec])
                        if done.returncode != 0:
                            log.error("cannot add %s rule to %s: %s", name, chain, done.stderr.strip())
                            continue
                        log.info("added %s %s rule %s to %s", name, " ".join(match), "ACCEPT", chain)
                placed[f"{backend}/{family}"] = chain
            self.placed = placed
            self._checked = time.monotonic()
            return dict(placed)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.ensure()
            except Exception:
                log.exception("checking Docker's firewall failed")
            stop.wait(FIREWALL_EVERY_S)
