"""Network-namespace lab for tests, benchmarks and `sockgate demo` (see builder.py)."""
from runtime.lab.builder import LAB, DnsAnswer, DnsResult, Lab, LabAddresses, LabCommandError, ProbeResult

__all__ = ["LAB", "DnsAnswer", "DnsResult", "Lab", "LabAddresses", "LabCommandError", "ProbeResult"]
