"""Which nf_tables notifications wake the agent's table check (pure parsing)."""
import struct

from runtime.kernel.netlink.nfnotify import NFNL_SUBSYS_NFTABLES, concerns

INET, IP = 1, 2
NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSETELEM, NEWGEN = 0, 2, 3, 5, 6, 8, 12, 15


def attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-(4 + len(payload)) % 4)


def message(msg: int, family: int, table: str | None) -> bytes:
    body = struct.pack("=BBH", family, 0, 0)
    if table is not None:
        body += attr(1, table.encode() + b"\0") + attr(2, b"forward\0")
    return struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_NFTABLES << 8 | msg, 0, 0, 0) + body


def test_changes_to_our_tables_rules_chains_and_the_table_itself_count():
    for msg in (DELTABLE, DELCHAIN, NEWRULE, DELRULE):
        assert concerns(message(msg, INET, "sockgate")), msg


def test_elements_new_objects_other_tables_and_families_do_not():
    for msg in (NEWSETELEM, NEWTABLE, NEWCHAIN):
        assert not concerns(message(msg, INET, "sockgate")), msg
    assert not concerns(message(DELRULE, INET, "firewalld"))
    assert not concerns(message(DELRULE, IP, "sockgate"))
    assert not concerns(message(NEWGEN, 0, None))


def test_a_datagram_of_several_messages_is_read_to_the_end():
    batch = message(NEWSETELEM, INET, "sockgate") + message(NEWGEN, 0, None) + message(DELTABLE, INET, "sockgate")
    assert concerns(batch)
    assert not concerns(batch[:-len(message(DELTABLE, INET, "sockgate"))])
    assert not concerns(b"\x00" * 7)  # truncated: nothing, no exception
