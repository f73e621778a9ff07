"""The policy file the lab uses: Google's ranges from the shared snapshot (the project
ships no copy), and the lab's DNS server as the resolver."""
from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.lab.builder import LAB, PROJECT_ROOT

# ../shared/data beside the checkout (CI puts a copy of shared/ there too).
GOOGLE_RANGES_DIR = Path(os.environ.get("SOCKGATE_GOOGLE_RANGES_DIR",
                                        PROJECT_ROOT.parent / "shared" / "data" / "google-ip-ranges"))


def lab_policy(**extra) -> dict:
    goog, cloud = GOOGLE_RANGES_DIR / "goog.json", GOOGLE_RANGES_DIR / "cloud.json"
    if not goog.is_file() or not cloud.is_file():
        raise FileNotFoundError(f"Google IP ranges snapshot not found in {GOOGLE_RANGES_DIR} "
                                "(set SOCKGATE_GOOGLE_RANGES_DIR)")
    # minTtl 1: the tests change DNS answers and wait for a TTL of a second or two.
    return {"googleRanges": {"goog": str(goog), "cloud": str(cloud)},
            "resolver": {"nameservers": list(LAB.dns_v4), "minTtl": 1, "timeout": 1}, **extra}


def write_lab_policy(path: Path, **extra) -> Path:
    path.write_text(json.dumps(lab_policy(**extra), indent=2))
    return path
