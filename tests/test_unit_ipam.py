"""Address allocation on disk (a temporary dir, no kernel)."""
import ipaddress
import threading

import pytest

from runtime import errors
from runtime.errors import SockgateError
from runtime.state.ipam import LeaseStore, Owner, candidates


def test_candidates_skip_network_and_broadcast():
    got = [str(a) for a in candidates(ipaddress.ip_network("192.0.2.0/29"), None)]
    assert got == [f"192.0.2.{i}" for i in range(1, 7)]


def test_candidates_resume_after_last_and_wrap():
    got = [str(a) for a in candidates(ipaddress.ip_network("192.0.2.0/29"), ipaddress.ip_address("192.0.2.5"))]
    assert got[:3] == ["192.0.2.6", "192.0.2.1", "192.0.2.2"]


def test_candidates_v6_keeps_last_address():
    got = list(candidates(ipaddress.ip_network("fd00::/126"), None))
    assert [str(a) for a in got] == ["fd00::1", "fd00::2", "fd00::3"]


def test_allocate_is_round_robin_and_exhausts(tmp_path):
    store = LeaseStore(tmp_path)
    pool = ipaddress.ip_network("192.0.2.0/30")  # two usable addresses
    a = store.allocate(pool, Owner("c1", "eth0"))
    b = store.allocate(pool, Owner("c2", "eth0"))
    assert {str(a), str(b)} == {"192.0.2.1", "192.0.2.2"}
    with pytest.raises(SockgateError) as info:
        store.allocate(pool, Owner("c3", "eth0"))
    assert info.value.code == errors.TRY_AGAIN_LATER and "192.0.2.0/30" in info.value.msg
    store.release_owner(Owner("c1", "eth0"))
    # Freed address comes back only when nothing else is free.
    assert str(store.allocate(pool, Owner("c4", "eth0"))) == "192.0.2.1"
    assert store.leases()[ipaddress.ip_address("192.0.2.1")] == Owner("c4", "eth0")


def test_concurrent_allocation_never_duplicates(tmp_path):
    store = LeaseStore(tmp_path)
    pool = ipaddress.ip_network("10.0.0.0/24")
    got: list = []
    lock = threading.Lock()

    def take(i: int) -> None:
        addr = LeaseStore(tmp_path).allocate(pool, Owner(f"c{i}", "eth0"))
        with lock:
            got.append(addr)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 50 and len(set(got)) == 50
    assert len(store.leases()) == 50


def test_release_owner_with_addresses_reads_only_those(tmp_path, monkeypatch):
    store = LeaseStore(tmp_path)
    v4, v6 = ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64")
    mine = Owner("c1", "eth0")
    a4, a6 = store.allocate(v4, mine), store.allocate(v6, mine)
    other = store.allocate(v4, Owner("c2", "eth0"))
    monkeypatch.setattr(LeaseStore, "leases", lambda self: pytest.fail("listed every lease"))
    assert sorted(map(str, store.release_owner(mine, (str(a4), str(a6))))) == sorted([str(a4), str(a6)])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [str(other)]


def test_release_owner_never_frees_another_owners_lease_and_falls_back_to_a_scan(tmp_path):
    store = LeaseStore(tmp_path)
    pool = ipaddress.ip_network("10.0.0.0/24")
    mine = store.allocate(pool, Owner("c1", "eth0"))
    theirs = store.allocate(pool, Owner("c2", "eth0"))
    # The record names an address that is now someone else's (or none at all, or junk):
    # only c1's own lease goes, found by the scan.
    assert store.release_owner(Owner("c1", "eth0"), (str(theirs), "not-an-address", "10.0.0.200")) == [mine]
    assert list(store.leases()) == [theirs]
    assert store.release_owner(Owner("c1", "eth0"), (str(theirs),)) == []


def test_allocate_probes_after_the_cursor_before_listing(tmp_path, monkeypatch):
    store = LeaseStore(tmp_path)
    pool = ipaddress.ip_network("10.0.0.0/24")
    first = store.allocate(pool, Owner("c0", "eth0"))
    listed = []
    real = __import__("os").listdir
    monkeypatch.setattr("runtime.state.ipam.os.listdir", lambda d: listed.append(d) or real(d))
    assert store.allocate(pool, Owner("c1", "eth0")) == first + 1
    assert listed == []


def test_allocate_lists_once_past_taken_addresses(tmp_path, monkeypatch):
    from runtime.state import ipam
    store = LeaseStore(tmp_path)
    pool = ipaddress.ip_network("10.0.0.0/24")
    for i in range(ipam.PROBES_BEFORE_LISTING + 5):     # taken behind the cursor's back
        (tmp_path / f"10.0.0.{i + 1}").write_bytes(b"x\neth0\n")
    listed = []
    real = __import__("os").listdir
    monkeypatch.setattr("runtime.state.ipam.os.listdir", lambda d: listed.append(d) or real(d))
    got = store.allocate(pool, Owner("c1", "eth0"))
    assert str(got) == f"10.0.0.{ipam.PROBES_BEFORE_LISTING + 6}" and len(listed) == 1
