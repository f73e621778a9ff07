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
    ep = Endpoint("sgabc", "10.77.0.5", "fd77::5")
    add = add_endpoint(ep)
    assert 'add element inet sockgate saddr4 { "sgabc" . 10.77.0.5 }' in add
    rm = remove_endpoint(ep)
    # add-then-delete in one transaction: succeeds whether or not the element exists.
    assert rm.startswith(add) and rm.count("delete element") == 5


def test_revision_stamp_changes_with_the_rules():
    plain, other = render_table(), render_table(EgressPolicy(rules=("meta l4proto icmp drop",)))
    assert "comment \"rev " in plain
    assert plain.split('comment "rev ')[1][:16] != other.split('comment "rev ')[1][:16]
