"""Refused-flow events: the agent's component that reads the kernel's NFLOG reports of
refused first packets and writes them to the events file (runtime.agent.event_log).

The file's reader API is re-exported here: `read_events(state_dir, pod=None,
container=None)` and `follow_events(...)`.
"""
from __future__ import annotations

from runtime.agent.event_log import EventLog, events_path, follow_events, read_events

__all__ = ["EventLog", "events_path", "follow_events", "read_events"]
