"""An address and port as text, the way URLs and `ss` write them: IPv6 in brackets,
so the port can't be read as part of the address."""
from __future__ import annotations


def host_port(addr: object, port: object) -> str:
    a = str(addr)
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"
