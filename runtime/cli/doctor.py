"""`sockgate doctor`: checks what a node needs for sockgate and says, for each check
that fails, what is wrong and what to do. Reads only: it never changes the node (no
sysctl, no rule, no file written), so it is safe on a node in trouble.

Everything is read in the network namespace doctor runs in, which must be the node's
(the agent's): sysctls under /proc/sys/net, iptables and nftables, the veths. Aim it
at another netns with `nsenter --net=PATH sockgate doctor` (what the tests do).

Each check is a small function of a DoctorConfig returning a Check."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from runtime import defaults, textable, wire
from runtime.errors import SockgateError

DAY = 86400.0
# Where runtimes pin network namespaces (README "Kubernetes workloads"; the DaemonSet
# mounts the first and the CRI one): ip netns, containerd's and CRI-O's default
# (/var/run is a link to /run on current distributions), containerd with
# netns_mounts_under_state_dir.
PIN_DIRS = ("/run/netns", "/var/run/netns", "/run/containerd/io.containerd.grpc.v1.cri/netns")
TOOL_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


@dataclass
class DoctorConfig:
    state_dir: str = defaults.STATE_DIR
    run_dir: str = defaults.RUN_DIR
    policy_file: str = defaults.POLICY_FILE
    netns_dirs: tuple[str, ...] = PIN_DIRS
    # 0: as many as are attached now (the agent's own rule, runtime/agent/conntrack_budget.py)
    expected_containers: int = 0
    ranges_max_age: float = 7 * DAY
    # Where /proc is: the unit tests point it at a directory of their own.
    proc: str = "/proc"
    run: Runner = field(default=_run, repr=False)
    which: Callable[[str], str | None] = field(default=lambda name: shutil.which(name, path=TOOL_PATH), repr=False)

    def sysctl(self, key: str) -> str | None:
        """net.ipv4.ip_forward -> the value in this netns; None when missing."""
        try:
            return (Path(self.proc) / "sys" / key.replace(".", "/")).read_text().strip()
        except OSError:
            return None


# --- sysctls --------------------------------------------------------------------------

def check_forwarding(cfg: DoctorConfig) -> Check:
    wanted = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
    values = {key: cfg.sysctl(key) for key in wanted}
    missing = [k for k, v in values.items() if v is None]
    off = [k for k, v in values.items() if v is not None and v != "1"]
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
    if missing:
        return Check("forwarding", False, f"{', '.join(missing)} missing in this netns (IPv6 disabled?); "
                     f"sockgate's containers are dual-stack and the node routes both families",
                     "enable IPv6 on the node (ipv6.disable=0 on the kernel command line, "
                     "net.ipv6.conf.all.disable_ipv6=0)")
    if off:
        return Check("forwarding", False, f"{shown}: the node does not forward containers' packets",
                     f"sysctl -w {' '.join(f'{k}=1' for k in off)} in the node's netns, and find what "
                     f"turned it off (a file in /etc/sysctl.d, a network manager): every ADD turns "
                     f"both on, so it went off behind sockgate's back; persist it in /etc/sysctl.d")
    return Check("forwarding", True, shown)


def _ip_json(cfg: DoctorConfig, tool: str, *args: str) -> list[dict]:
    cp = cfg.run([tool, "-j", *args])
    if cp.returncode != 0:
        raise RuntimeError(f"ip -j {' '.join(args)}: {cp.stderr.strip() or f'exit status {cp.returncode}'}")
    return [item for item in json.loads(cp.stdout or "[]") if item]  # `ip -j` lists {} for links it skips


def check_mtu(cfg: DoctorConfig) -> Check:
    """A forwarded packet larger than its way out is answered ("fragmentation needed",
    "packet too big") by ip_forward before any nft rule sees it, to whatever source it
    names: with a veth MTU above the uplink's, a container could aim those answers at
    a victim of its choosing (README "Threat model"). The way out is the default
    route's: its MTU metric if it has one (ip_forward honours it), else its device's.
    The node's end of a veth takes IP packets up to 4 bytes over its own MTU (room for
    a VLAN tag): sockgate makes it 4 bytes smaller than the container's end
    (runtime.kernel.netns.node_end_mtu), so what it takes is the network's MTU."""
    from netpolicy.ruleset import CONTAINER_IFGROUP
    from runtime.kernel.netns import VETH_SLACK
    tool = cfg.which("ip")
    if tool is None:
        return Check("mtu", False, "no `ip` tool found: the veths' MTU can't be read", "install iproute2")
    links = _ip_json(cfg, tool, "link", "show")
    veths = {link["ifname"]: link["mtu"] for link in links if link.get("group") == str(CONTAINER_IFGROUP)}
    device_mtu = {link["ifname"]: link["mtu"] for link in links}
    exits: dict[str, int] = {}
    for family in ("-4", "-6"):
        for route in _ip_json(cfg, tool, family, "route", "show", "default"):
            metric = next((m["mtu"] for m in route.get("metrics", []) if "mtu" in m), None)
            devices = [route["dev"]] if "dev" in route else [hop["dev"] for hop in route.get("nexthops", [])]
            for dev in devices:
                if dev in device_mtu:
                    exits[f"{dev} (IPv{family[1]})"] = metric or device_mtu[dev]
    if not veths:
        return Check("mtu", True, "no container veth here")
    if not exits:
        return Check("mtu", True, "no default route: containers' packets go nowhere to be too big for")
    way_out, smallest = min(exits.items(), key=lambda item: item[1])
    above = sorted(name for name, mtu in veths.items() if mtu + VETH_SLACK > smallest)
    if above:
        return Check("mtu", False,
                     f"{len(above)} of {len(veths)} container veths ({', '.join(above[:3])}"
                     f"{' …' if len(above) > 3 else ''}) take packets above {smallest} bytes "
                     f"(their MTU + {VETH_SLACK}), the default route's MTU via {way_out}: a container can make "
                     f"the node send "
                     f"'fragmentation needed' to a forged source before any rule sees the packet",
                     f"set the network's mtu to {smallest} or less (CNI config `mtu`, Docker's "
                     f"com.docker.network.driver.mtu); containers attached after that get it. "
                     f"A veth a sockgate before 2026-12-07 made is narrowed at the next table "
                     f"reload, which an upgrade brings")
    return Check("mtu", True, f"{len(veths)} container veths at most the default route's MTU {smallest} "
                              f"(via {way_out})")


def check_state_dir(cfg: DoctorConfig) -> Check:
    """Every container veth here must be recorded in this state dir: a table load
    restores (and, when the segment meter changed, renews) the elements of its own
    state dir's containers only. Another's keep theirs, and at a meter's renewal lose
    its part of their tx counters: billed short, without a note (README,
    "Configuration reference", stateDir)."""
    from netpolicy.ruleset import CONTAINER_IFGROUP
    from runtime.state.store import attachments
    tool = cfg.which("ip")
    if tool is None:
        return Check("state-dir", False, "no `ip` tool found: the veths can't be listed", "install iproute2")
    veths = {link["ifname"] for link in _ip_json(cfg, tool, "link", "show")
             if link.get("group") == str(CONTAINER_IFGROUP)}
    other = sorted(veths - {att.host_ifname for att in attachments(cfg.state_dir).records})
    if not other:
        return Check("state-dir", True, f"every container veth here ({len(veths)}) is recorded in {cfg.state_dir}")
    shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
    return Check("state-dir", False,
                 f"{len(other)} of {len(veths)} container veths are not recorded in {cfg.state_dir}: {shown} "
                 f"(a conflist or an agent with another stateDir, or records removed by hand)",
                 "use one stateDir per node: the same in every sockgate conflist and the agent's --state-dir; "
                 "a table load restores its own state dir's containers only, and bills another's short when "
                 "the segment meter is replaced")


def check_conntrack(cfg: DoctorConfig) -> Check:
    events = cfg.sysctl("net.netfilter.nf_conntrack_events")
    acct = cfg.sysctl("net.netfilter.nf_conntrack_acct")
    if events is None:
        return Check("conntrack", False, "nf_conntrack is not loaded in this netns (no "
                     "net.netfilter.nf_conntrack_events): idle reclaim and the flow bounds need it",
                     "load sockgate's table, which loads it: start the agent, or `sockgate policy apply`")
    acct_note = (f"nf_conntrack_acct={acct} (sockgate doesn't need it: billing reads the nft counters, "
                 f"not conntrack's)")
    if events == "0":
        return Check("conntrack", False, f"nf_conntrack_events=0: the kernel sends no conntrack events, so idle "
                     f"flows are reclaimed only by the periodic sweep, and idle UDP flows not at all; {acct_note}",
                     "sysctl -w net.netfilter.nf_conntrack_events=1 in the node's netns (the agent's "
                     "reclaimer sets it at start: something reset it) and persist it in /etc/sysctl.d")
    meaning = {"1": "events always", "2": "events while someone listens: the agent's reclaimer does, and its "
                                          "sweep catches TCP flows created while it was down"}.get(events, "?")
    return Check("conntrack", True, f"nf_conntrack_events={events} ({meaning}); {acct_note}")


def check_conntrack_max(cfg: DoctorConfig) -> Check:
    from runtime.agent.conntrack_budget import CONTAINER_SHARE, Budget, count_attachments
    from runtime.core import policy
    raw = cfg.sysctl("net.netfilter.nf_conntrack_max")
    if raw is None or not raw.isdigit():
        return Check("conntrack-max", False, "net.netfilter.nf_conntrack_max not readable (nf_conntrack not loaded)",
                     "load sockgate's table, which loads it: start the agent, or `sockgate policy apply`")
    try:
        bounds = policy.load_policy(cfg.policy_file).limits
    except SockgateError as exc:
        return Check("conntrack-max", False, f"the policy's limits can't be read: {exc}",
                     f"`sockgate policy check --policy {cfg.policy_file}` names the field at fault")
    attached = count_attachments(cfg.state_dir)
    expected = max(attached, cfg.expected_containers)
    budget = Budget(int(raw), bounds, expected)
    now = Budget(int(raw), bounds, attached).describe()
    why = (f"--expected-containers {cfg.expected_containers}" if cfg.expected_containers > attached
           else f"the {attached} attached")
    if budget.fits:
        return Check("conntrack-max", True, f"{now}; checked for {why}")
    return Check("conntrack-max", False,
                 f"{now}: {why} at their bound need more than {int(CONTAINER_SHARE * 100)} % of the "
                 f"table, so together they can fill it and new flows of every container and of the node fail",
                 f"sysctl -w net.netfilter.nf_conntrack_max={budget.needed_max} in the node's initial network "
                 f"namespace (persist it in /etc/sysctl.d), or lower the policy's limits")


# --- iptables next to nftables --------------------------------------------------------

def _legacy_tables(cfg: DoctorConfig, family: int) -> list[str]:
    name = "ip_tables_names" if family == 4 else "ip6_tables_names"
    try:
        return (Path(cfg.proc) / "net" / name).read_text().split()
    except OSError:
        return []


def _accepts_sg(lines: list[str], chain: str) -> set[str]:
    """Which of -i/-o sg+ `chain`'s rules (`iptables -S` lines) accept."""
    found: set[str] = set()
    for line in lines:
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if words[:2] != ["-A", chain] or words[-2:] != ["-j", "ACCEPT"]:
            continue
        for flag in ("-i", "-o"):
            if flag in words and words.index(flag) + 1 < len(words) and words[words.index(flag) + 1] == "sg+":
                found.add(flag)
    return found


def _forward_verdict(cfg: DoctorConfig, tool: str) -> tuple[bool | None, str]:
    """(lets sockgate's veths through, what was seen) for one iptables tool; None:
    could not be read."""
    head = cfg.run([tool, "-w", "5", "-S", "FORWARD"])
    if head.returncode != 0:
        return None, f"`{Path(tool).name} -S FORWARD` failed: {head.stderr.strip()}"
    forward = head.stdout.splitlines()
    if not forward or forward[0].strip() != "-P FORWARD DROP":
        return True, "FORWARD policy " + (forward[0].split()[-1] if forward else "?")
    user = cfg.run([tool, "-w", "5", "-S", "DOCKER-USER"])
    user_lines = user.stdout.splitlines() if user.returncode == 0 else []
    jumps = any(shlex.split(line)[-2:] == ["-j", "DOCKER-USER"] for line in forward if line.startswith("-A FORWARD"))
    accepted = _accepts_sg(forward, "FORWARD") | (_accepts_sg(user_lines, "DOCKER-USER") if jumps else set())
    if accepted == {"-i", "-o"}:
        return True, "FORWARD policy DROP; sockgate's veths (sg+) accepted" + (" in DOCKER-USER" if jumps else "")
    where = "DOCKER-USER" if user.returncode == 0 else "FORWARD (no DOCKER-USER chain)"
    lacking = " and ".join(f"{flag} sg+" for flag in ("-i", "-o") if flag not in accepted)
    return False, f"FORWARD policy DROP and no ACCEPT for {lacking} in {where}"


def check_docker_forward(cfg: DoctorConfig) -> Check:
    """Docker sets iptables' FORWARD policy to DROP; sockgate's traffic passes only
    where something accepts its veths first (the agent's Docker door puts ACCEPT rules
    for sg+ in DOCKER-USER: runtime/docker/firewall.py). Read with each backend's own
    tool, `-S` (which creates nothing: an absent table lists as policy ACCEPT); the
    legacy backend only where its filter table exists, so that looking never loads it."""
    from runtime.docker.firewall import ForwardAccept
    seen, bad, unread = [], [], []
    for backend, family, name in ForwardAccept.TOOLS:
        if backend == "legacy" and "filter" not in _legacy_tables(cfg, family):
            continue
        tool = cfg.which(name)
        if tool is None:
            continue
        verdict, what = _forward_verdict(cfg, tool)
        line = f"{name}: {what}"
        seen.append(line)
        if verdict is False:
            bad.append((name, line))
        elif verdict is None:
            unread.append(line)
    if not seen:
        return Check("docker-forward", True, "no iptables tool found: no Docker firewall to pass")
    if bad:
        adds = "; ".join(f"{t} -I DOCKER-USER -i sg+ -j ACCEPT; {t} -I DOCKER-USER -o sg+ -j ACCEPT"
                         for t, _ in bad)
        return Check("docker-forward", False,
                     "; ".join(line for _, line in bad) + ": every forwarded packet of sockgate's containers is "
                     "dropped there, whatever table inet sockgate accepts",
                     "run the agent with --docker-socket (its Docker door keeps these rules), or add them: "
                     f"{adds} (no DOCKER-USER chain: -I FORWARD instead). table inet sockgate still polices "
                     "that traffic: its drops are final")
    if unread:
        return Check("docker-forward", False, "; ".join(unread),
                     "read the rules by hand (`iptables-nft -S FORWARD`, `ip6tables-nft -S FORWARD`) and make "
                     "sure packets from and to sg+ interfaces are accepted")
    return Check("docker-forward", True, "; ".join(seen))


def check_iptables_legacy(cfg: DoctorConfig) -> Check:
    loaded = {f"IPv{family}": tables for family in (4, 6) if (tables := _legacy_tables(cfg, family))}
    if not loaded:
        return Check("iptables-legacy", True, "no iptables-legacy table in this netns")
    shown = "; ".join(f"{fam}: {', '.join(tables)}" for fam, tables in loaded.items())
    return Check("iptables-legacy", False,
                 f"iptables-legacy tables next to nftables ({shown}): their rules apply to every packet as "
                 f"well, and neither `nft list ruleset` nor iptables-nft shows them",
                 "if nothing on this node should use the legacy backend, point iptables at iptables-nft "
                 "(update-alternatives --set iptables /usr/sbin/iptables-nft; the same for ip6tables) and "
                 "remove the legacy rules (iptables-legacy-save shows them); if Docker uses it, its "
                 "FORWARD DROP is checked by docker-forward")


# --- sockgate's own state -------------------------------------------------------------

def check_ranges(cfg: DoctorConfig) -> Check:
    from runtime.cli.status import age_text, ranges_state
    from runtime.core import policy
    from runtime.core.ranges import _is_url
    update = (f"sockgate ranges update --policy {cfg.policy_file} --state-dir {cfg.state_dir} (the DaemonSet's "
              f"policy-sync container and sockgate-ranges.timer do it daily: read their logs for why not)")
    try:
        google = policy.load_policy(cfg.policy_file).google
    except SockgateError as exc:
        return Check("ranges-cache", False, f"the policy can't be read: {exc}",
                     f"`sockgate policy check --policy {cfg.policy_file}` names the field at fault")
    sources = (google.goog, google.cloud)
    urls = any(_is_url(s) for s in sources)
    st = ranges_state(cfg.state_dir)
    if not st.exists:
        effect = ("every ADD fails with CNI code 50 until it exists" if urls else
                  "the next ADD computes it from the files the policy names, each time until it is written")
        return Check("ranges-cache", False, f"no Google ranges cache at {st.path}: {effect}", update)
    if st.detail:
        return Check("ranges-cache", False, f"{st.path}: {st.detail}", update)
    made = f"{st.path}: {st.ipv4} IPv4 and {st.ipv6} IPv6 CIDRs, fetched {age_text(st.age_seconds)} ago"
    if urls and st.age_seconds is not None and st.age_seconds > cfg.ranges_max_age:
        return Check("ranges-cache", False,
                     f"{made}, more than {age_text(cfg.ranges_max_age)}: Google's list changes, and a stale one "
                     f"leaves new Google ranges open or keeps addresses Compute Engine took over blocked", update)
    if not urls and st.age_seconds is not None:
        made_at = time.time() - st.age_seconds
        # (1 s of slack: `updated` has whole seconds)
        newer = [s for s in sources if Path(s).is_file() and Path(s).stat().st_mtime > made_at + 1]
        if newer:
            return Check("ranges-cache", False, f"{made}, before {', '.join(newer)} changed", update)
    return Check("ranges-cache", True, made)


def check_table(cfg: DoctorConfig) -> Check:
    from runtime.cli.status import table_state
    t = table_state(cfg.policy_file, cfg.state_dir)
    apply = f"start the agent (it loads the table and keeps it), or `sockgate policy apply --policy {cfg.policy_file}`"
    if not t.loaded:
        return Check("table", False, f"{t.detail}: containers' traffic is neither filtered nor masqueraded", apply)
    if t.current is False:
        return Check("table", False, f"table inet sockgate has revision {t.loaded_revision}; the policy renders "
                     f"{t.policy_revision}: the agent reloads a changed policy within seconds (is it running?)",
                     apply)
    if t.current is None:
        return Check("table", True, f"loaded, revision {t.loaded_revision} (the policy's can't be told: {t.detail})")
    return Check("table", True, f"loaded, revision {t.loaded_revision}, the one the policy renders")


def check_netns_pins(cfg: DoctorConfig) -> Check:
    """Every ready attachment's netns must open here: the agent enters it for idle
    reclaim and CHECK. A pin that doesn't (a plain file: the runtime's bind mount
    didn't reach this mount namespace) while the veth is there means the pin dir is
    not visible; with the veth gone, the container vanished (the sweep's)."""
    from runtime.kernel import netns
    from runtime.state.store import READY, attachments
    ready = [a for a in attachments(cfg.state_dir).records if a.state == READY and a.netns]
    dirs = [d for d in cfg.netns_dirs if Path(d).is_dir()]
    if not ready:
        return Check("netns-pins", True, "no attachment to check; pin dirs here: " + (", ".join(dirs) or "none"))
    present = set(netns.links([a.host_ifname for a in ready]))
    hidden: list[tuple[str, str]] = []  # (path, why)
    vanished = 0
    for att in ready:
        try:
            netns.check_netns(att.netns)
        except SockgateError as exc:
            if att.host_ifname in present:
                hidden.append((att.netns, exc.msg))
            else:
                vanished += 1
    note = f"; {vanished} of a vanished container (`sockgate gc` removes them)" if vanished else ""
    if hidden:
        parents = sorted({str(Path(path).parent) for path, _ in hidden})
        shown = ", ".join(f"{path} ({why})" for path, why in hidden[:3]) + (" …" if len(hidden) > 3 else "")
        return Check("netns-pins", False,
                     f"{len(hidden)} of {len(ready)} attachments' network namespaces can't be opened here while "
                     f"their veth exists: {shown}{note}",
                     f"make the runtime's pin dir ({', '.join(parents)}) visible to the agent: in Kubernetes a "
                     f"hostPath volume with mountPropagation: HostToContainer (deploy/kubernetes/sockgate.yaml, "
                     f"the netns-pin-* volumes; README \"Kubernetes workloads\")")
    return Check("netns-pins", True, f"{len(ready) - vanished} attachments' network namespaces open here{note}")


def check_segmentation(cfg: DoctorConfig) -> Check:
    """Every container end must have its segmentation offloads off: a veth hands the
    node a super-packet whole, and billing counts it once while the wire carries every
    segment (README "Billing"). TCP's may be on where the node has a segment meter,
    which counts them (runtime/kernel/segment_meter.py). Only a container with
    CAP_NET_ADMIN can turn the others back on. Costs a thread that enters each
    container's netns (~0.1 ms each)."""
    from runtime.kernel import ethtool, netns, nft
    from runtime.state.store import READY, attachments
    ready = [a for a in attachments(cfg.state_dir).records if a.state == READY and a.netns and a.ipv4]
    present = set(netns.links([a.host_ifname for a in ready]))
    on: list[tuple[str, tuple[str, ...]]] = []
    unread = 0
    metered = netns.tcp_offload_metered() and nft.counts_along_meter()
    for att in ready:
        if att.host_ifname not in present:
            continue  # a vanished container: netns-pins and `sockgate gc` speak of it
        try:
            features = netns.container_segmentation(att.netns, att.ipv4)
        except SockgateError:
            unread += 1
            continue
        features = tuple(f for f in features if not (metered and ethtool.is_tcp(f)))
        if features:
            on.append((att.pod or att.container_id, features))
    note = f"; {unread} could not be read (netns-pins says why)" if unread else ""
    if on:
        shown = ", ".join(f"{who} ({', '.join(features)})" for who, features in on[:3]) + (" …" if len(on) > 3 else "")
        if not metered and all(ethtool.is_tcp(f) for _, features in on for f in features):
            # ADD left TCP's on for a meter that has gone since (its pins removed).
            return Check("segmentation", False,
                         f"{len(on)} container end(s) with TCP segmentation offload on and not the segment meter "
                         f"the table counts along: {shown}; their TCP super-packets can't be billed as the wire "
                         f"carries them{note}",
                         "the meter's pins (under /run/sockgate/bpf or /sys/fs/bpf/sockgate) were removed: the "
                         "agent's table check puts a new meter in place with the table within seconds; without an "
                         "agent, the next ADD or DEL does. (Or a container holding CAP_NET_ADMIN turned them on: take "
                         "that capability away.)")
        return Check("segmentation", False,
                     f"{len(on)} container end(s) with segmentation offload on: {shown}; the node bills each "
                     f"super-packet they send once, while the wire carries every segment{note}",
                     "a container that holds CAP_NET_ADMIN turned them on: take that capability away "
                     "and attach it again (ADD turns them off)")
    kept = "TCP's metered, the others off" if metered else "off"
    return Check("segmentation", True, f"{len(present) - unread} container end(s) with segmentation offload "
                                       f"{kept}{note}")


def check_agent(cfg: DoctorConfig) -> Check:
    from runtime.cli.status import probe_socket
    path = wire.agent_socket(cfg.run_dir)
    up, why = probe_socket(path)
    if up:
        return Check("agent", True, f"answers on {path}")
    return Check("agent", False, f"{why}: CNI requests run in the CNI executable's own process (slower), or fail "
                 f"with code 11 where the compiled one has no sockgate-python beside it; no idle reclaim, no "
                 f"periodic billing, no table reload",
                 "start it: systemctl start sockgate-agent (a node without Kubernetes), or see `kubectl -n "
                 "sockgate-system logs ds/sockgate -c agent`; its log says why it stopped")


def check_lab_namespaces(cfg: DoctorConfig) -> Check:
    from runtime.lab.builder import Lab  # builder only: stdlib, no lab extras
    stale = Lab.stale_namespaces()
    if not stale:
        return Check("lab-namespaces", True, "no stale sgl- lab namespace")
    return Check("lab-namespaces", False,
                 f"{len(stale)} lab namespace(s) whose creator died: {', '.join(stale[:5])}"
                 + (" …" if len(stale) > 5 else ""), "sockgate lab-cleanup")


CHECKS: tuple[Callable[[DoctorConfig], Check], ...] = (
    check_agent, check_table, check_state_dir, check_forwarding, check_mtu, check_conntrack, check_conntrack_max,
    check_docker_forward, check_iptables_legacy, check_ranges, check_netns_pins, check_segmentation,
    check_lab_namespaces)


def run_checks(cfg: DoctorConfig) -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            results.append(check(cfg))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            name = check.__name__.removeprefix("check_").replace("_", "-")
            results.append(Check(name, False, f"the check itself failed: {type(exc).__name__}: {exc}",
                                 "report it with this output"))
    return results


def to_json(results: list[Check]) -> dict:
    return {"ok": all(c.ok for c in results), "checks": [asdict(c) for c in results]}


def render(results: list[Check]) -> str:
    out = textable.lines(["check", "result", "detail"],
                         [(c.name, "ok" if c.ok else "FAIL", c.detail) for c in results], left=[0, 1, 2])
    failed = [c for c in results if not c.ok]
    if failed:
        out += ["", "What to do:"]
        out += [f"- {c.name}: {c.fix}" for c in failed]
    out += ["", f"{len(failed)} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed"]
    return "\n".join(out)
