"""libnftables through ctypes: the same parser and transactions as the `nft` command,
without a fork and exec per call. Contexts are kept per netns (a context's netlink
socket is bound to the netns of the thread that created it).

Design notes: docs/dataplane.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

_OUTPUT_JSON = 1 << 4


class Unavailable(Exception):
    pass


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise Unavailable(str(exc)) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, fn).restype = ctypes.c_char_p
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


class Nft:
    def __init__(self) -> None:
        self._lib = _load()
        self._ctx: dict[int, int] = {}
        self._lock = threading.Lock()

    def _context(self) -> int:
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        ctx = self._ctx.get(netns)
        if ctx is None:
            ctx = self._lib.nft_ctx_new(0)
            if not ctx:
                raise Unavailable("nft_ctx_new failed")
            self._lib.nft_ctx_buffer_output(ctx)
            self._lib.nft_ctx_buffer_error(ctx)
            self._ctx[netns] = ctx
        return ctx

    def cmd(self, text: str, json_output: bool = False) -> tuple[int, str, str]:
        """(return code, output, error text) of one command buffer: one transaction."""
        with self._lock:
            ctx = self._context()
            self._lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(ctx, text.encode())
            out = (self._lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        return rc, out, err
