"""docker-compose (Debian's v1) brings up the documented example,
examples/compose/docker-compose.yml, against a real dockerd with the sockgate agent,
through pytest-docker's fixtures; the app service gets the outbound contract."""
from __future__ import annotations

import json
import secrets
import shlex
import time
from pathlib import Path
from typing import Iterator

import pytest
from pytest_docker.plugin import DockerComposeExecutor, get_docker_services

from runtime.lab import LAB
from tests.support.dockerd import IMAGE, DockerEnv, docker_env
from tests.support.plugin import nft_set

pytestmark = [pytest.mark.lab, pytest.mark.clients]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compose" / "docker-compose.yml"


# pytest-docker's fixtures, module-scoped and pointed at the harness's dockerd.
@pytest.fixture(scope="module")
def compose_env(tmp_path_factory) -> Iterator[DockerEnv]:
    tmp = tmp_path_factory.mktemp("compose")
    with docker_env(tmp, tmp / "images") as env:
        yield env


@pytest.fixture(scope="module")
def docker_compose_command(compose_env: DockerEnv) -> str:
    # pytest-docker runs this through the shell: the variables go to docker-compose only.
    return f"DOCKER_HOST={shlex.quote(compose_env.host.base_url)} APP_IMAGE={IMAGE} /usr/bin/docker-compose"


@pytest.fixture(scope="module")
def docker_compose_file() -> str:
    return str(EXAMPLE)


@pytest.fixture(scope="module")
def docker_compose_project_name() -> str:
    return f"sgcompose{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def docker_setup() -> list[str]:
    return ["up -d"]  # compose v1 has no --wait


@pytest.fixture(scope="module")
def docker_cleanup() -> list[str]:
    return ["down -v"]


@pytest.fixture(scope="module")
def docker_services(docker_compose_command, docker_compose_file, docker_compose_project_name, docker_setup,
                    docker_cleanup):
    with get_docker_services(docker_compose_command, docker_compose_file, docker_compose_project_name,
                             docker_setup, docker_cleanup) as services:
        yield services


@pytest.fixture(scope="module")
def compose(docker_compose_command, docker_compose_file, docker_compose_project_name) -> DockerComposeExecutor:
    return DockerComposeExecutor(docker_compose_command, docker_compose_file, docker_compose_project_name)


def app_sh(compose: DockerComposeExecutor, script: str) -> str:
    """`docker-compose exec -T app sh -c SCRIPT`; output, whatever the exit code."""
    return compose.execute(f"exec -T app sh -c {shlex.quote(script)}", success_codes=range(256)).decode()


def outbound(compose: DockerComposeExecutor, host: str, port: int) -> dict | None:
    out = app_sh(compose, f"echo compose | nc -w 3 {host} {port}")
    first = out.strip().splitlines()[0] if out.strip() else ""
    return json.loads(first) if first.startswith("{") else None


def test_compose_app_gets_the_outbound_contract(compose_env, docker_services, compose, docker_compose_project_name):
    docker_services.wait_until_responsive(check=lambda: outbound(compose, LAB.public_v4, 9000) is not None,
                                          timeout=30.0, pause=0.5)
    # The network compose created is a sockgate one, with no Docker IPAM address.
    net = compose_env.client.networks.get(f"{docker_compose_project_name}_app")
    assert net.attrs["Driver"] == "sockgate" and net.attrs["IPAM"]["Driver"] == "null"
    addrs = app_sh(compose, "ip -o addr show dev eth0")
    assert " 10.77." in addrs and " fd77:5067:6174:" in addrs, addrs
    for dst, node_addr in ((LAB.public_v4, LAB.node_uplink_v4), (LAB.public_v6, LAB.node_uplink_v6)):
        seen = outbound(compose, dst, 9000)
        assert seen is not None and seen["peer"] == node_addr, seen
    for dst, port in ((LAB.google_v4, 443), (LAB.public_v4, 25), (LAB.public_v6, 21), ("10.77.0.1", 9000)):
        out = app_sh(compose, f"echo x | nc -w 3 {dst} {port}; echo rc=$?")
        assert "rc=1" in out, f"{dst}:{port} must be refused: {out}"
    # Billing knows the service's container by its compose name.
    name = f"{docker_compose_project_name}_app_1"
    records = compose_env.state / "networks" / "docker" / "attachments"

    def labelled() -> bool:
        return any(json.loads(p.read_text())["labels"].get("container_name") == name for p in records.glob("*.json"))

    deadline = time.monotonic() + 20
    while not labelled():
        assert time.monotonic() < deadline, f"no attachment labelled {name}"
        time.sleep(0.2)


def test_compose_down_leaves_nothing(compose_env, docker_services, compose):
    # Runs after the contract test (file order); `down` here, pytest-docker's cleanup
    # then finds nothing to do.
    compose.execute("down -v")
    state = compose_env.state / "networks" / "docker"
    deadline = time.monotonic() + 15
    while True:
        left = {"leases": [p.name for p in (state / "leases").glob("*") if not p.name.startswith(".")],
                "records": [p.name for p in (state / "attachments").glob("*.json")],
                "endpoints": [p.name for p in (compose_env.state / "docker" / "endpoints").glob("*.json")],
                "networks": [p.name for p in (compose_env.state / "docker" / "networks").glob("*.json")],
                "tx4": nft_set(compose_env.node, "tx4")}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not any(left.values()), left
