"""`sockgate seccomp …`: the seccomp profile that enforces contract row C12 (socket
options) inside containers, for Docker, podman, containerd and Kubernetes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.cli.commands import command, group
from runtime.fsutil import atomic_write


def _generate(args: argparse.Namespace) -> int:
    from netpolicy.seccomp import generate, render
    text = render(generate(args.format, strict=args.strict, contract_only=args.contract_only))
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        atomic_write(Path(args.output), text.encode(), mode=0o644)
        print(f"wrote {args.format} seccomp profile{' (strict)' if args.strict else ''} to {args.output}",
              file=sys.stderr)
    return 0


def add_seccomp_commands(sub: argparse._SubParsersAction) -> None:
    from netpolicy.seccomp import FORMATS, KUBELET_SECCOMP_ROOT, KUBERNETES_PROFILE_PATH
    seccomp = group(sub, "seccomp", help="seccomp profile for the socket-option contract (C12)")
    g = command(
        seccomp, "generate", _generate, help="print or write the seccomp profile",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Generate the seccomp profile of contract row C12 (socket options):
  setsockopt/getsockopt succeed only for SO_KEEPALIVE, SO_DEBUG, TCP_NODELAY, SO_LINGER,
  SO_OOBINLINE, SO_SNDBUF, SO_RCVBUF and SO_REUSEADDR (plus IP_RECVERR/IPV6_RECVERR for
  glibc's resolver, and read-only getsockopt options such as SO_ERROR); every other
  option fails with ENOPROTOOPT;
  socket() allows AF_INET/AF_INET6 TCP and UDP and AF_UNIX; raw, packet, netlink, ping,
  SCTP ... sockets fail with EPERM;
  --strict: listen() fails with EPERM;
  everything else an ordinary program needs is allowed (modelled on Docker's default).""",
        epilog=f"""use it:
  docker run --security-opt seccomp=sockgate.json ...
  podman run --security-opt seccomp=sockgate.json ...
  ctr run --seccomp --seccomp-profile sockgate.json ...
  Kubernetes: install the file on every node as
    {KUBELET_SECCOMP_ROOT}/{KUBERNETES_PROFILE_PATH}
  and set securityContext.seccompProfile to
    {{type: Localhost, localhostProfile: {KUBERNETES_PROFILE_PATH}}}""")
    g.add_argument("--format", choices=FORMATS, default="docker",
                   help="docker: Docker's format with archMap; kubernetes: a flat architectures list "
                        "(the OCI shape containerd's CRI and CRI-O read for Localhost profiles) "
                        "(default: %(default)s)")
    g.add_argument("--strict", action="store_true", help="also deny listen() (EPERM), for every socket family")
    g.add_argument("--contract-only", action="store_true",
                   help="exactly the eight options of the contract: no IP_RECVERR/IPV6_RECVERR and no "
                        "read-only getsockopt options (breaks glibc DNS over UDP and non-blocking connect)")
    g.add_argument("-o", "--output", metavar="FILE", help="write here (atomically) instead of stdout")
