"""`sockgate agent`: the node agent. It serves CNI requests forwarded by the shim on a
root-only unix socket (the same handler the shim would run in-process), and runs the
node's background work: keeping exception hostnames resolved, idle reclaim, billing.
Logs are JSON lines on stderr, and nothing else is.

Overview: docs/architecture.md; README "The node agent".
"""
from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, TextIO

from runtime import defaults, wire
from runtime.agent import agent_info
from runtime.cni.entry import execute
from runtime.cni.request import COMMANDS
from runtime.core.node import Node
from runtime.fsutil import atomic_write

if TYPE_CHECKING:
    from runtime.agent.metrics import EventCounts, RequestMetrics

log = logging.getLogger("sockgate.agent")
MAX_REQUEST_BYTES = 4 << 20
# The shim sends its whole request right after connecting; a client that hasn't within
# this time is dropped, so that it can't hold a handler thread (and a shutdown) forever.
READ_TIMEOUT_S = 10.0
# A reply is a few KiB, far below a unix socket's buffer: sending only waits for a
# client that stopped reading with a full buffer.
SEND_TIMEOUT_S = 10.0
# How often a handler waiting for a request looks whether the agent is stopping, and
# how often the accept loop does: both bound how late a SIGTERM is acted upon.
SLICE_S = 0.1
CNI_COMMANDS = frozenset(COMMANDS)


class Component(Protocol):
    """Background work: runs until `stop` is set, then returns (after a last flush)."""

    def run(self, stop: threading.Event) -> None: ...


@dataclass
class AgentConfig:
    state_dir: str = defaults.STATE_DIR
    run_dir: str = defaults.RUN_DIR
    policy_file: str = defaults.POLICY_FILE
    ready_file: str = ""
    metrics_address: str = defaults.METRICS_ADDRESS
    # The Docker door (runtime/docker/driver.py, served by docker_http.py): Docker's remote network driver
    # protocol on this socket ("" = off; production: /run/docker/plugins/sockgate.sock),
    # and dockerd's API, asked in the background who owns an endpoint.
    docker_socket: str = ""
    docker_host: str = defaults.DOCKER_HOST
    components: list[tuple[str, Callable[["AgentConfig"], Component]]] = field(default_factory=list)
    # Set by run_agent when metrics are served: the Docker door reports each call's
    # path, success and duration here.
    observe_docker: Callable[[str, bool, float], None] | None = None
    # What the requests and the components share: the backends, the compiled policy,
    # whether the table is watched (the caller gives it its link reaper).
    node: Node = field(default_factory=Node.open)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            msg = record.getMessage()
        except Exception as exc:  # noqa: BLE001 - else logging prints its own traceback on stderr
            msg = f"{record.msg!r} % {record.args!r} (cannot format: {type(exc).__name__}: {exc})"
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": msg}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StrayText(io.TextIOBase):
    """The agent's sys.stderr once logging is set up. Text written there outside
    logging (the stdlib servers of the Docker door and of the metrics print a failed
    request's traceback there, as socketserver does) becomes log lines, one per line of
    text, so stderr stays JSON Lines whoever writes."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real
        self.log = logging.getLogger("sockgate.stderr")
        self._partial: dict[int, str] = {}  # per thread: a line written in pieces
        self._lock = threading.Lock()
        self._inside = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only here, as on the real stream
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.real.fileno()

    def write(self, text: str) -> int:
        if getattr(self._inside, "active", False):
            return len(text)  # logging failed and says so here: writing it again would recurse
        me = threading.get_ident()
        with self._lock:
            *lines, rest = (self._partial.pop(me, "") + text).split("\n")
            if rest:
                self._partial[me] = rest
        self._emit(lines)
        return len(text)

    def flush(self) -> None:
        # The interpreter flushes stderr at exit: a last line without its newline too.
        # (Only the caller's: another thread may be half-way through a line.)
        with self._lock:
            rest = self._partial.pop(threading.get_ident(), "")
        self._emit([rest])

    def _emit(self, lines: list[str]) -> None:
        self._inside.active = True
        try:
            for line in lines:
                if line.strip():
                    self.log.error("%s", line)
        finally:
            self._inside.active = False


def _log_uncaught(kind: str, exc_info: tuple) -> None:
    if exc_info[0] is not None and issubclass(exc_info[0], SystemExit):
        return
    log.critical("uncaught exception in %s", kind, exc_info=exc_info)


def setup_logging() -> None:
    """JSON lines on stderr for everything: log records, warnings, exceptions nobody
    caught (in any thread, or in a __del__), and text printed to stderr directly."""
    logging.Formatter.converter = time.gmtime
    real = sys.stderr if not isinstance(sys.stderr, _StrayText) else sys.stderr.real
    handler = logging.StreamHandler(real)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(True)
    sys.excepthook = lambda *exc_info: _log_uncaught("the main thread", exc_info)
    threading.excepthook = lambda args: _log_uncaught(
        f"thread {args.thread.name if args.thread else '?'}", (args.exc_type, args.exc_value, args.exc_traceback))
    sys.unraisablehook = lambda u: log.error(
        "exception ignored in %r: %s", u.object, u.err_msg or "", exc_info=u.exc_value)
    sys.stderr = _StrayText(real)


class _NoRequest(Exception):
    """The client sent no complete request: why."""


def _malformed(details: str) -> dict:
    return {"cniVersion": defaults.CNI_VERSION, "code": 6, "msg": "malformed request to the agent", "details": details}


def _command_label(env: dict[str, str]) -> str:
    # A metric label: a client's arbitrary CNI_COMMAND must not create time series.
    command = env.get("CNI_COMMAND", "")
    return command if command in CNI_COMMANDS else "other"


class _Handler(socketserver.BaseRequestHandler):
    """One forwarded CNI request. Whatever happens (a malformed request, a client that
    hangs up before the answer or never sends its request), it ends in one log line
    and one count in the metrics."""

    server: "_Server"

    def handle(self) -> None:
        started = time.monotonic()
        env: dict[str, str] = {}
        try:
            raw = self._receive()
        except (_NoRequest, OSError) as exc:
            why = str(exc) if isinstance(exc, _NoRequest) else f"{type(exc).__name__}: {exc}"
            self._done("other", "client_gone", started, logging.WARNING, "no request in %.1f ms: %s",
                       (time.monotonic() - started) * 1000, why)
            return
        if not raw:
            # The Kubernetes liveness probe (deploy/kubernetes): connect, send nothing,
            # expect an answer. Not a CNI request, and not worth a log line every 20 s.
            self._send(wire.encode_reply(1, json.dumps(_malformed("empty request"))))
            log.debug("empty request (a liveness probe) answered")
            return
        try:
            if len(raw) > MAX_REQUEST_BYTES:
                raise ValueError(f"request larger than {MAX_REQUEST_BYTES >> 20} MiB")
            env, stdin = wire.decode_request(raw)
        except ValueError as exc:
            what = f"malformed request ({exc})"
            rc, out = 1, json.dumps(_malformed(str(exc)))
        else:
            what = f"{env.get('CNI_COMMAND')} {env.get('CNI_CONTAINERID', '')}/{env.get('CNI_IFNAME', '')}"
            rc, out = execute(env, stdin, self.server.node)
        lost = self._send(wire.encode_reply(rc, out))
        ms = (time.monotonic() - started) * 1000
        command = _command_label(env)
        if lost:
            # The work is done (an ADD attached): the runtime, having no answer, retries
            # or DELs, as it must after any failed ADD.
            self._done(command, "client_gone", started, logging.WARNING,
                       "%s rc=%d in %.1f ms; answer not delivered, the client hung up (%s)", what, rc, ms, lost)
        else:
            self._done(command, "ok" if rc == 0 else "error", started, logging.INFO,
                       "%s rc=%d in %.1f ms", what, rc, ms)

    def _receive(self) -> bytes:
        """The request, up to the client's end of sending. Waits in slices so that a
        client that sends nothing can't hold a SIGTERM up: such a client has no
        request in flight."""
        sock: socket.socket = self.request
        sock.settimeout(SLICE_S)
        deadline = time.monotonic() + READ_TIMEOUT_S
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                if self.server.stopping.is_set():
                    raise _NoRequest("the agent is shutting down") from None
                if time.monotonic() > deadline:
                    raise _NoRequest(f"none complete within {READ_TIMEOUT_S:.0f} s") from None
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:  # not read to its end: the caller refuses it
                return b"".join(chunks)

    def _send(self, reply: bytes) -> str:
        """"" when the client has the answer, else why not."""
        sock: socket.socket = self.request
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            sock.sendall(reply)
        except OSError as exc:  # EPIPE, ECONNRESET: the client is gone; a timeout: it stopped reading
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _done(self, command: str, result: str, started: float, level: int, fmt: str, *args: object) -> None:
        self.server.observe(command, result, time.monotonic() - started)
        log.log(level, fmt, *args)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False  # shutdown waits for requests in flight
    block_on_close = True
    # socketserver's default backlog is 5: a burst of container starts (a node taking
    # a deployment's pods) would overflow it, and a full backlog refuses a unix
    # socket's connect at once (EAGAIN) instead of queueing it.
    request_queue_size = 512

    def __init__(self, path: str, node: Node) -> None:
        self.stopping = threading.Event()
        self.node = node
        # (command, result, seconds) of every request: the metrics', when served.
        self.observe: Callable[[str, str, float], None] = lambda command, result, seconds: None
        super().__init__(path, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver would print the traceback on stderr, in plain text.
        log.error("serving a CNI request failed", exc_info=True)

    def serve_backlog(self) -> int:
        """After serve_forever returned: serve the connections already queued (their
        clients sent a request and wait for it), then stop accepting. Once the socket's
        path is gone nobody new can connect, so this leaves nobody behind."""
        self.socket.setblocking(False)
        served = 0
        while True:
            try:
                request, address = self.socket.accept()
            except OSError:  # BlockingIOError: the queue is empty
                return served
            request.setblocking(True)
            self.process_request(request, address)
            served += 1


def _notify(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), path)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def _bind(path: Path, node: Node) -> _Server:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if path.exists():
        # A socket left by a killed agent: refuse to steal a live one.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise SystemExit(f"another sockgate agent is listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    old = os.umask(0o177)  # root-only socket
    try:
        return _Server(str(path), node)
    finally:
        os.umask(old)


def _start_metrics(cfg: AgentConfig, reclaims: Callable[[], dict] | None,
                   events: EventCounts | None = None) -> RequestMetrics | None:
    """The metrics endpoint, if one is configured. An address that can't be bound (the
    port taken, the node IP not there yet) is logged, and the agent serves CNI without
    metrics: a node's pods must not wait for its monitoring."""
    if not cfg.metrics_address:
        return None
    from runtime.agent.metrics import SockgateCollector, registry_for, serve
    registry, requests = registry_for(SockgateCollector(cfg.state_dir, reclaims, events))
    try:
        serve(cfg.metrics_address, registry)
    except OSError as exc:
        log.error("cannot serve metrics on %s: %s; serving CNI requests without metrics",
                  cfg.metrics_address, exc.strerror or exc)
    return requests


def run_agent(cfg: AgentConfig, reclaims: Callable[[], dict] | None = None,
              events: EventCounts | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cfg.metrics_address:
        from runtime.agent.metrics import parse_address
        try:
            parse_address(cfg.metrics_address)
        except ValueError as exc:
            raise SystemExit(f"--metrics-address: {exc}") from None
    sock_path = Path(wire.agent_socket(cfg.run_dir))
    server = _bind(sock_path, cfg.node)
    # Before the components: the Docker door observes its calls from its start.
    requests = _start_metrics(cfg, reclaims, events)
    if requests is not None:
        server.observe = requests.observe_cni
        cfg.observe_docker = requests.observe_docker
    # Components stop only after the last request finished: a DEL in flight may still
    # hand work to them (a link to reap, a final billing record).
    background = threading.Event()
    workers: list[threading.Thread] = []
    serving = threading.Thread(target=server.serve_forever, name="rpc", kwargs={"poll_interval": SLICE_S})
    try:
        _start_components(cfg, background, workers)
        serving.start()
        # Before the ready file: a failure here must not leave a ready one behind.
        agent_info.write(cfg.run_dir, state_dir=cfg.state_dir, policy_file=cfg.policy_file, socket=str(sock_path),
                         metrics_address=cfg.metrics_address, docker_socket=cfg.docker_socket)
        if cfg.ready_file:
            # Whole or not at all: whoever waits for the file reads the pid at once
            # (a plain write let test_ops read it empty).
            atomic_write(Path(cfg.ready_file), str(os.getpid()).encode(), durable=False)
    except BaseException:
        # A component that can't be made (a bad option), an unwritable ready file: the
        # threads already started would keep the process alive, neither serving nor
        # ready, deaf to SIGTERM (whose handler only sets `stop`). Stop them and fail.
        log.error("start failed; stopping what had started")
        sock_path.unlink(missing_ok=True)
        _stop(server, serving, background, workers)
        raise
    _notify("READY=1")
    log.info("ready: serving CNI requests on %s (pid %d)", sock_path, os.getpid())
    _wait_for_signal(stop)
    # Ready file first: nothing may take an agent that is going away for a ready one.
    if cfg.ready_file:
        Path(cfg.ready_file).unlink(missing_ok=True)
    agent_info.clear(cfg.run_dir)
    _notify("STOPPING=1")
    # Then the socket's path: from now on the shim runs requests in-process.
    sock_path.unlink(missing_ok=True)
    log.info("shutting down: ready file and socket removed, finishing the requests in flight")
    _stop(server, serving, background, workers)
    log.info("stopped")
    return 0


def _start_components(cfg: AgentConfig, background: threading.Event, workers: list[threading.Thread]) -> None:
    components = list(cfg.components)
    if cfg.docker_socket:
        from runtime.docker.http import docker_component
        components.append(("docker", docker_component))
    for name, factory in components:
        component = factory(cfg)
        thread = threading.Thread(target=_guarded, args=(name, component, background), name=name)
        thread.start()
        workers.append(thread)


def _stop(server: _Server, serving: threading.Thread, background: threading.Event,
          workers: list[threading.Thread]) -> None:
    """Finish the requests in flight (and those queued), then stop the components."""
    server.stopping.set()
    if serving.is_alive():
        server.shutdown()  # serve_forever returns
    queued = server.serve_backlog()
    if queued:
        log.info("serving %d request(s) that were queued when the stop came", queued)
    server.server_close()  # waits for the requests in flight
    if serving.ident is not None:  # started
        serving.join()
    background.set()
    for thread in workers:
        thread.join()


def _wait_for_signal(stop: threading.Event) -> None:
    """Until SIGTERM or SIGINT. Not stop.wait(): the kernel hands a process's signal to
    whichever of its threads it likes, Python runs the handler only in the main thread
    once that one runs, and a main thread asleep on a lock sleeps through it (seen here
    about one stop in ten while DNS lookups kept other threads busy). The signal
    module's wakeup fd is written by whichever thread took the signal, and says which."""
    wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        while not stop.is_set():
            if select.select([r], [], [], 1.0)[0] and wanted & set(os.read(r, 64)):
                stop.set()
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)


def _guarded(name: str, component: Component, stop: threading.Event) -> None:
    """A component that crashes is logged and restarted: the agent keeps serving CNI."""
    while not stop.is_set():
        try:
            component.run(stop)
            return
        except Exception:
            log.exception("component %s failed; restarting in 5 s", name)
            stop.wait(5)
