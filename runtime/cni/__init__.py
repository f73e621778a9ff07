"""The CNI door: a request parsed (request), run (handlers) and answered (result);
entry is what the agent and the shim's in-process path call.

Imports nothing: the shim's in-process VERSION must not pull in the handlers (pyroute2).
"""
