"""Defaults every side of sockgate agrees on: the node's directories, the agent's
socket name, the CNI versions spoken.

Imports nothing: the CNI shim loads this on every container start (with
runtime/__init__.py empty, `import runtime.defaults` costs two tiny modules).
No `from __future__ import annotations` either, for the same reason.
"""

STATE_DIR = "/var/lib/sockgate"
RUN_DIR = "/run/sockgate"
POLICY_FILE = "/etc/sockgate/policy.json"
# The agent's unix socket, under the network's runDir.
AGENT_SOCKET = "agent.sock"
METRICS_ADDRESS = "127.0.0.1:9464"
DOCKER_HOST = "unix:///var/run/docker.sock"

# The CNI spec version sockgate speaks when the caller names none it knows.
CNI_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
