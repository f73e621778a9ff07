"""The conntrack budget the agent reports (pure arithmetic on the policy's limits)."""
from netpolicy.ruleset import CLOSING_S, FlowBounds
from runtime.agent.conntrack_budget import CONTAINER_SHARE, Budget


def test_a_container_at_its_bound_includes_its_closing_flows():
    b = FlowBounds(max_flows=1000, new_flows_per_second=50, new_flows_burst=100)
    assert b.entries == 1000 + 100 + 50 * CLOSING_S


def test_room_fits_and_the_value_to_set():
    bounds = FlowBounds()                      # 2224 entries per container
    table = 262144
    room = int(table * CONTAINER_SHARE) // bounds.entries
    assert Budget(table, bounds, room).fits and not Budget(table, bounds, room + 1).fits
    short = Budget(table, bounds, room + 12)
    # The advised maximum holds every attached container within the share, exactly.
    assert Budget(short.needed_max, bounds, short.attachments).fits
    assert not Budget(short.needed_max - bounds.entries, bounds, short.attachments).fits
    assert "nf_conntrack_max is 262144" in short.describe() and f"holds {room} containers" in short.describe()
