"""Attachment records on disk (pure file handling, a temp dir)."""
import json
from dataclasses import asdict

from runtime.store import Attachment, AttachmentStore


def test_a_record_with_fields_of_a_later_version_still_loads(tmp_path):
    store = AttachmentStore(tmp_path)
    att = Attachment("net", "c1", "eth0", "/run/netns/x", "sgabc", "10.77.0.5", "fd77::5", generation="1a2b3c4d")
    store.save(att)
    path = tmp_path / "c1--eth0.json"
    path.write_text(json.dumps(dict(asdict(att), field_of_2027={"x": 1})))
    assert store.load("c1", "eth0") == att   # the unknown field is left out, the rest kept
    path.write_text("[1, 2]")
    assert store.load("c1", "eth0") is None  # not a record at all
