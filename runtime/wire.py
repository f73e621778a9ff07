"""The shim ↔ agent wire format. Not JSON: `import json` pulls in `re`, and the shim's
start-up is on the path of every container start.

request: b"SG1\\n" + b"\\0".join(b"KEY=VALUE" for each CNI_* variable) + b"\\0\\0" + stdin
reply:   b"<exit code>\\n" + stdout

Also the agent's socket path and the client's connect. No `from __future__`: one
module more at every start (annotations naming typing's types are strings).
"""
# The C module under `socket`: socket.py itself imports enum and selectors and builds
# IntEnums at import, ~14 ms of every container start on the development machine.
import _socket
import os
import time

from runtime.defaults import AGENT_SOCKET, RUN_DIR

if False:  # for type checkers only: importing typing costs ~5 ms at start-up
    from typing import Mapping

# Long enough for an ADD under load; a hung agent must not hang the runtime forever.
AGENT_TIMEOUT_S = 120.0

MAGIC = b"SG1\n"


def encode_request(env: "Mapping[str, str]", stdin: bytes) -> bytes:
    pairs = [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items() if k.startswith("CNI_")]
    return MAGIC + b"\0".join(pairs) + b"\0\0" + stdin


def decode_request(raw: bytes) -> tuple[dict[str, str], bytes]:
    if not raw.startswith(MAGIC):
        raise ValueError("not a sockgate request")
    head, sep, stdin = raw[len(MAGIC):].partition(b"\0\0")
    if not sep:
        raise ValueError("truncated sockgate request")
    env = {}
    for pair in filter(None, head.split(b"\0")):
        key, eq, value = pair.decode("utf-8", "surrogateescape").partition("=")
        if not eq or not key.startswith("CNI_"):
            raise ValueError(f"bad variable in request: {key!r}")
        env[key] = value
    return env, stdin


def encode_reply(rc: int, stdout: str) -> bytes:
    return f"{rc}\n".encode() + stdout.encode()


def decode_reply(raw: bytes) -> tuple[int, str]:
    code, sep, out = raw.partition(b"\n")
    if not sep:
        raise ValueError("truncated reply from the agent")
    return int(code), out.decode()


def top_level_string(config: bytes, key: str) -> str | None:
    """The value of a simple top-level string field, without a JSON parser: enough to
    find runDir. None when absent or not simple (escapes): the caller then parses."""
    needle = f'"{key}"'.encode()
    at = config.find(needle)
    if at < 0 or config.find(needle, at + 1) >= 0:
        return None
    rest = config[at + len(needle):].lstrip()
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip()
    if not rest.startswith(b'"'):
        return None
    value, sep, _ = rest[1:].partition(b'"')
    if not sep or b"\\" in value:
        return None
    return value.decode("utf-8", "replace")


def agent_socket(run_dir: str = RUN_DIR) -> str:
    """The socket of the agent serving runDir."""
    return os.path.join(run_dir, AGENT_SOCKET)


def connect(path: str, timeout: float = AGENT_TIMEOUT_S) -> "_socket.socket | None":
    """None when no agent listens on `path`."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            # The agent's accept backlog is full: it is busy, not gone. (A unix socket
            # with a timeout fails such a connect with EAGAIN instead of waiting.)
            if time.monotonic() > deadline:
                sock.close()
                return None
            time.sleep(0.005)
        except OSError:
            # No agent (ENOENT, ECONNREFUSED), or none we can reach (EACCES, a path too
            # long): nothing was sent.
            sock.close()
            return None


def exchange(sock: "_socket.socket", env: "Mapping[str, str]", stdin: bytes) -> tuple[int, str]:
    """One request and its reply; OSError or ValueError when the reply is broken."""
    sock.sendall(encode_request(env, stdin))
    sock.shutdown(_socket.SHUT_WR)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return decode_reply(b"".join(chunks))
