"""Errors that cross a door (CNI, Docker, CLI) carry a CNI error code.

Stdlib only: the CNI shim imports this on its start path.
"""
from __future__ import annotations

from dataclasses import dataclass

# Codes from the CNI spec 1.1.0, "Error" section.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_LIMITED = 51

# Our own codes (the spec reserves 100+ for plugins).
INTERNAL = 100
ALREADY_ATTACHED = 101
KERNEL_FAILURE = 102
CHECK_FAILED = 103


@dataclass
class SockgateError(Exception):
    """An error with a CNI code, a one-line message and optional details."""

    code: int
    msg: str
    details: str = ""

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg

    def to_cni(self, cni_version: str) -> dict:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg,
                "details": self.details}
