"""Attachment records on disk (pure file handling, a temp dir)."""
import json
from dataclasses import asdict

from runtime.state.store import Attachment, AttachmentStore, attachments, record_paths


def test_a_record_with_fields_of_a_later_version_still_loads(tmp_path):
    store = AttachmentStore(tmp_path)
    att = Attachment("net", "c1", "eth0", "/run/netns/x", "sgabc", "10.77.0.5", "fd77::5", generation="1a2b3c4d")
    store.save(att)
    path = tmp_path / "c1--eth0.json"
    path.write_text(json.dumps(dict(asdict(att), field_of_2027={"x": 1})))
    assert store.load("c1", "eth0") == att   # the unknown field is left out, the rest kept
    path.write_text("[1, 2]")
    assert store.load("c1", "eth0") is None  # not a record at all


def test_the_listing_of_every_network_and_of_one(tmp_path):
    def save(net: str, cid: str) -> Attachment:
        att = Attachment(net, cid, "eth0", f"/run/netns/{cid}", f"sg{cid}")
        AttachmentStore(tmp_path / "networks" / net / "attachments").save(att)
        return att
    a, b, c = save("n1", "a"), save("n1", "b"), save("n2", "c")
    torn = tmp_path / "networks" / "n2" / "attachments" / "d--eth0.json"
    torn.write_text("{")
    listing = attachments(tmp_path)
    assert listing.records == [a, b, c]             # by network, then file name
    assert listing.unreadable == [torn]
    assert listing.networks == ["n1", "n2"] and listing.complete() == {"n1"}
    assert attachments(tmp_path, "n1").records == [a, b]
    assert record_paths(tmp_path) == [*sorted((tmp_path / "networks" / "n1" / "attachments").glob("*.json")),
                                      tmp_path / "networks" / "n2" / "attachments" / "c--eth0.json", torn]
    assert attachments(tmp_path / "nothing").records == [] and record_paths(tmp_path / "nothing") == []
