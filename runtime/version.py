"""The installed sockgate's version: what `sockgate --version` prints and the agent's
`sockgate_build_info` metric carries."""
from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """The installed distribution's version (setup.cfg), or "unknown" for a source
    tree used without installing it. Cached: the metrics ask at every scrape."""
    from importlib import metadata
    try:
        return metadata.version("sockgate")
    except metadata.PackageNotFoundError:
        return "unknown"
