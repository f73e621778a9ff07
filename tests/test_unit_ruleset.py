"""The table rendering (pure)."""
from netpolicy.ruleset import EgressPolicy, Endpoint, add_endpoint, remove_endpoint, render_table


def test_render_is_deterministic_and_idempotent_in_form():
    text = render_table()
    assert text == render_table()
    # Every chain is flushed before it is filled: loading twice never duplicates rules.
    for chain in ("forward", "input", "output", "postrouting", "from_container", "egress_policy"):
        assert f"flush chain inet sockgate {chain}\n" in text
    assert "masquerade fully-random" in text
    assert "ct state invalid counter drop" in text


def test_policy_plugs_into_egress_chain():
    text = render_table(EgressPolicy(sets=(("blocked4", "type ipv4_addr; flags interval"),),
                                     rules=("ip daddr @blocked4 drop",)))
    assert "add set inet sockgate blocked4 { type ipv4_addr; flags interval; }" in text
    assert "add rule inet sockgate egress_policy ip daddr @blocked4 drop" in text


def test_endpoint_elements_and_idempotent_removal():
    ep = Endpoint("sgabc", 42, "10.77.0.5", "fd77::5")
    add = add_endpoint(ep)
    # Keyed by interface index; counted elements name their veth for billing.
    assert 'add element inet sockgate tx4 { 42 . 10.77.0.5 comment "sgabc" }' in add
    assert 'add element inet sockgate rx { 42 comment "sgabc" }' in add
    assert 'add element inet sockgate ifaces { "sgabc" }' in add
    rm = remove_endpoint(ep)
    # add-then-delete in one transaction: succeeds whether or not the element exists.
    assert rm.startswith(add) and rm.count("delete element") == 4
    assert "delete element inet sockgate tx6 { 42 . fd77::5 }" in rm


def test_busy_path_is_one_lookup_before_any_jump():
    forward = [l for l in render_table().splitlines() if l.startswith("add rule inet sockgate forward")]
    # A reply into a container: one lookup; a container's own packet skips it by
    # direction and meets its own lookup next.
    assert ("forward ct direction reply meta iifgroup != 0x5347 ct state established,related "
            "meta oif @rx accept") in forward[0]
    assert forward[1].endswith("forward ct state established meta iif . ip saddr @tx4 accept")
    assert "jump" not in " ".join(forward[:4])
    # What lets a packet into a container without its flow's first packet being
    # checked never takes one that came from a container (forged replies).
    for rule in forward[:4]:
        assert "@rx" not in rule or "meta iifgroup != 0x5347" in rule, rule


def test_revision_stamp_changes_with_the_rules():
    plain, other = render_table(), render_table(EgressPolicy(rules=("meta l4proto icmp drop",)))
    assert "comment \"rev " in plain
    assert plain.split('comment "rev ')[1][:16] != other.split('comment "rev ')[1][:16]
