"""What a Kubernetes node does around a pod that tests need to stand in for, in the lab's
node netns: kubelet's httpGet probe, kube-proxy's DNAT of a ClusterIP service, and a
cluster DNS server behind it (in the lab's internet). Shared by the lab tests that
attach with the CNI plugin directly (tests/test_k8s_policy.py) and the ones that go
through CRI (tests/test_cri.py)."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

SERVICE_IP = "10.96.0.10"   # the cluster DNS service (kube-proxy DNATs it)
COREDNS_IP = "10.244.0.53"  # where the DNAT sends it: private, refused on its own
KUBEPROXY_TABLE = "sg_kubeproxy_sim"
# What a probe the policy stops prints: a drop times out, a reject is refused (an empty
# output, a probe that didn't run, is neither).
STOPPED = ("TimeoutError", "ConnectionRefusedError")

# kubelet's httpGet probe, run in the node netns: a GET with a deadline, the status
# code printed (or the error's name).
HTTP_GET = r"""
import http.client, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    c.request("GET", "/healthz")
    print(c.getresponse().status)
except OSError as exc:
    print(type(exc).__name__)
"""

# kubelet's tcpSocket probe: it passes when the connection opens (then closed at once).
TCP_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
"""


def tcp_probe(lab, ns: str, host: str, port: int, timeout: float = 2.0) -> str:
    """kubelet's tcpSocket probe of host:port from ns: "open", or the error. (A probe's
    timeoutSeconds defaults to 1.)"""
    return lab.run(ns, [sys.executable, "-c", TCP_CONNECT, host, str(port), str(timeout)],
                   timeout=timeout + 10).stdout.strip()


def http_get(lab, ns: str, host: str, port: int, timeout: float = 2.0) -> str:
    """kubelet's httpGet probe of host:port from ns: the status code, or the error."""
    return lab.run(ns, [sys.executable, "-c", HTTP_GET, host, str(port), str(timeout)],
                   timeout=timeout + 10).stdout.strip()


def kubeproxy_dnat(lab, ports: tuple[int, ...]) -> None:
    """What kube-proxy's nftables mode does for a ClusterIP service: prerouting DNAT
    of SERVICE_IP:port to an endpoint (here COREDNS_IP, same port), in the node netns.
    The table is ours (KUBEPROXY_TABLE); remove it with remove_kubeproxy_dnat."""
    rules = "\n".join(f"add rule ip {KUBEPROXY_TABLE} prerouting ip daddr {SERVICE_IP} {proto} dport {port} "
                      f"dnat to {COREDNS_IP}:{port}" for port in ports for proto in ("udp", "tcp"))
    lab.run(lab.node, ["nft", "-f", "-"], input=(
        f"add table ip {KUBEPROXY_TABLE}\n"
        f"add chain ip {KUBEPROXY_TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
        f"{rules}\n"))


def remove_kubeproxy_dnat(lab, check: bool = True) -> None:
    lab.run(lab.node, ["nft", "delete", "table", "ip", KUBEPROXY_TABLE], check=check)


@contextlib.contextmanager
def cluster_dns_server(lab, log: Path) -> Iterator[None]:
    """A DNS server at COREDNS_IP (and SERVICE_IP itself, to show that a flow reaching
    the service address without the DNAT stays refused), in the lab's internet,
    answering the lab's records. The kube-proxy table is the caller's to create; it is
    removed here too. Everything goes at exit, also on failure."""
    added = []
    server = None
    try:
        for addr in (COREDNS_IP, SERVICE_IP):
            lab.run(lab.internet, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
            added.append(addr)
        server = lab.popen(lab.internet, [sys.executable, "-m", "runtime.lab.dns", "--records", str(lab.dns_records),
                                 "--listen", COREDNS_IP, "--listen", SERVICE_IP], log=log)
        deadline = time.monotonic() + 10
        while not lab.dns_query(lab.internet, "smtp.gmail.com", server=COREDNS_IP, timeout=0.5).ok:
            assert time.monotonic() < deadline, log.read_text()
        yield
    finally:
        # Stopped here rather than at the lab's teardown: the next user binds the same
        # addresses.
        if server is not None:
            server.kill()
            server.wait(10)
        remove_kubeproxy_dnat(lab, check=False)
        for addr in added:
            lab.run(lab.internet, ["ip", "addr", "del", f"{addr}/32", "dev", "lo"], check=False)
