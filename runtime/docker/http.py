"""Docker's plugin protocol transport: HTTP/1.1 over the plugin's unix socket, and the
agent component that serves it. Requests are POSTs with a JSON body and no
Content-Type; each is bounded in time (a hung handler would hang dockerd)."""
from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any, Callable

from runtime.core.node import Node
from runtime.docker.driver import DockerDriver
from runtime.docker.firewall import ForwardAccept
from runtime.docker.options import DriverConfig

log = logging.getLogger("sockgate.docker")
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
MAX_BODY = 1 << 20
READ_TIMEOUT_S = 30.0      # a client that doesn't send its request in time is dropped
SWEEP_EVERY_S = 5.0
# Calls that carry ids: an empty body is dockerd's retry of a call cut short.
NEEDS_BODY = {f"/NetworkDriver.{c}" for c in ("CreateNetwork", "DeleteNetwork", "CreateEndpoint", "DeleteEndpoint",
                                                "Join", "Leave", "EndpointOperInfo")}

class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S

    def address_string(self) -> str:  # AF_UNIX peers have no address
        return "docker"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http: " + fmt, *args)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        started = time.monotonic()
        answer = self._serve(started)
        self.server.observe(self.path, "Err" not in answer, time.monotonic() - started)

    def _serve(self, started: float) -> dict:
        """Answers the call; returns the answer sent."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            answer = {"Err": "bad Content-Length"}
            self._reply(400, answer)
            return answer
        raw = self.rfile.read(length) if length else b""
        if not raw.strip() and self.path in NEEDS_BODY:
            # dockerd retries a call whose connection broke (the agent killed during it)
            # with its body already spent: an empty request (review 11).
            call = self.path.rsplit(".", 1)[-1]
            answer = {"Err": f"sockgate: empty {call} request: dockerd's retry of a call the sockgate agent did "
                             f"not answer (the agent was restarted during it); nothing was done for it: run the "
                             f"docker command again"}
            self._reply(200, answer)
            return answer
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:  # no Content-Type is sent: the body is JSON by contract
            answer = {"Err": f"request body is not a JSON object: {exc}"}
            self._reply(400, answer)
            return answer
        status, answer = self.server.driver.dispatch(self.path, body)
        self._reply(status, answer)
        if status == 200 and "Err" not in answer:
            try:
                self.server.driver.answered(self.path, body)
            except Exception:  # the startup sweep of a later agent would undo it: say so
                log.exception("recording that %s was answered failed", self.path)
        what = self.path.rsplit(".", 1)[-1]
        eid = str(body.get("EndpointID") or body.get("NetworkID") or "")[:12]
        level = logging.INFO if what not in ("EndpointOperInfo", "GetCapabilities", "Activate") else logging.DEBUG
        log.log(level, "docker %s %s %s in %.1f ms", what, eid, "error: " + answer["Err"] if "Err" in answer else "ok",
                (time.monotonic() - started) * 1000)
        return answer

    def do_GET(self) -> None:
        self._reply(404, {"Err": "POST only"})


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True
    block_on_close = False
    driver: DockerDriver
    # (path, answered without error, seconds) of every call: the agent's metrics, if served.
    observe: Callable[[str, bool, float], None]

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would want (host, port)
        self.server_name, self.server_port = "sockgate", 0

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver would print the traceback on stderr, in plain text (a client,
        # dockerd, that went away mid-call is the usual one): one JSON log line instead.
        log.warning("serving a Docker driver call failed", exc_info=True)


def bind_socket(path: str, driver: DockerDriver,
                observe: Callable[[str, bool, float], None] | None = None) -> _Server:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise SystemExit(f"another process serves the Docker plugin socket {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            p.unlink(missing_ok=True)
        finally:
            probe.close()
    old = os.umask(0o177)  # root-only: dockerd runs as root
    try:
        server = _Server(path, _Handler)  # type: ignore[arg-type]  # AF_UNIX: the address is a path
    finally:
        os.umask(old)
    server.driver = driver
    server.observe = observe or (lambda path, ok, seconds: None)
    return server


class DockerDoor:
    """The agent component: the plugin socket, Docker's firewall, the identity
    resolver and the periodic sweep. Binds and reconciles in the constructor, so the
    agent reports ready only once Docker can reach the driver."""

    def __init__(self, cfg: DriverConfig, node: Node | None = None,
                 observe: Callable[[str, bool, float], None] | None = None) -> None:
        self.cfg = cfg
        self.firewall = ForwardAccept()
        self.driver = DockerDriver(cfg, self.firewall, node)
        try:
            self.firewall.ensure()
        except Exception:
            log.exception("checking Docker's firewall failed")
        undone = self.driver.sweep(startup=True)
        if undone:
            log.info("startup: %d stale Docker endpoint(s) cleaned up", len(undone))
        self.driver.pending_identities()
        self.server = bind_socket(cfg.socket_path, self.driver, observe)
        log.info("serving Docker's network driver protocol on %s (driver name %r)", cfg.socket_path,
                 Path(cfg.socket_path).stem)

    def run(self, stop: threading.Event) -> None:
        threads = [threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                    name="docker-http"),
                   threading.Thread(target=self.firewall.run, args=(stop,), name="docker-firewall"),
                   threading.Thread(target=self.driver.identity.run, args=(stop,), name="docker-identity")]
        for t in threads:
            t.start()
        try:
            while not stop.wait(SWEEP_EVERY_S):
                try:
                    self.driver.sweep()
                except Exception:
                    log.exception("sweep of Docker endpoints failed")
        finally:
            self.server.shutdown()
            self.server.server_close()
            self.driver.ops.wait_idle(self.cfg.op_timeout)
            try:
                os.unlink(self.cfg.socket_path)
            except FileNotFoundError:
                pass
            for t in threads:
                t.join()


def docker_component(cfg: Any) -> DockerDoor:
    """Factory for runtime.agent.service: an AgentConfig with docker_socket set."""
    return DockerDoor(DriverConfig(state_dir=cfg.state_dir, run_dir=cfg.run_dir, policy_file=cfg.policy_file,
                                   socket_path=cfg.docker_socket, docker_host=cfg.docker_host), cfg.node,
                      cfg.observe_docker)
