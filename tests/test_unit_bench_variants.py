"""bench-dataplane --variants: the variants file, the round order and the summary (pure logic)."""
from pathlib import Path

import pytest

from netpolicy.ruleset import BASE_CHAINS, REGULAR_CHAINS, Endpoint
from runtime.bench.dataplane import Test as Metric  # not "Test": pytest would collect it
from runtime.bench.variants import (
    AS_IS,
    Shares,
    Variant,
    VariantsError,
    parse_variants,
    rate,
    rotated,
    summarize,
    with_measured,
)

SHIPPED = sorted(Path(__file__).parent.parent.joinpath("scripts", "variants").glob("*"))
FILE = """\
# what the before_routing chain costs
[without-before-routing]
delete chain inet sockgate before_routing

[again]
[one-lookup]
  flush chain inet sockgate forward
add rule inet sockgate forward meta iif . ip saddr @tx4 accept
"""


def test_parses_names_and_their_commands_in_order():
    got = parse_variants(FILE)
    assert got == [Variant("without-before-routing", ("delete chain inet sockgate before_routing",)),
                   Variant("again", ()),
                   Variant("one-lookup", ("flush chain inet sockgate forward",
                                          "add rule inet sockgate forward meta iif . ip saddr @tx4 accept"))]
    assert got[2].script.count("\n") == 2 and got[1].script == ""


@pytest.mark.parametrize("text, names", [
    ("", "no variant"),
    ("# only a comment\n", "no variant"),
    ("delete chain inet sockgate before_routing\n[x]\n", "line 1: an nft command before the first [name]"),
    ("[a]\n[a]\n", "line 2: variant name 'a' is taken"),
    ("[sockgate]\n", "line 1: variant name 'sockgate' is taken (config B as it is)"),
    ("[Has Space]\n", "line 1: variant name 'Has Space'"),
    ("[]\n", "line 1: variant name ''"),
])
def test_bad_files_name_the_line_and_what_is_wrong(text, names):
    with pytest.raises(VariantsError, match=names.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_variants(text, "v.txt")


def test_every_variant_takes_every_position_over_the_rounds():
    names = [AS_IS, "a", "b"]
    orders = [rotated(names, r) for r in range(3)]
    assert orders[0] == names
    for position in range(3):
        assert sorted(o[position] for o in orders) == sorted(names)


TCP4, UDP6 = Metric("tcp4", "tcp", 4), Metric("udp6", "udp", 6)


def _shares(*hooks: float) -> Shares:
    s = Shares()
    for h in hooks:
        s.add(UDP6, {"samples": 100, "hook_share": h, "in_prerouting_chain": 10, "cpu_busy": 1.0,
                     "sent_pps": 512_400.0, "sent_bps": 3.0e8})
    return s


def test_summary_is_medians_and_the_difference_from_b_as_it_is():
    got = summarize({"udp4": {AS_IS: _shares(0.056, 0.058, 0.057), "without": _shares(0.049, 0.048, 0.060)}})
    b, w = got["udp4"][AS_IS], got["udp4"]["without"]
    assert b["hooks"] == pytest.approx(0.057) and b["vs_sockgate"] == 0
    assert w["hooks"] == pytest.approx(0.049) and w["vs_sockgate"] == pytest.approx(-0.008)
    assert w["expected_ratio"] == pytest.approx(0.951) and w["prerouting"] == pytest.approx(0.1)
    assert w["rounds"] == [0.049, 0.048, 0.060] and w["sent"] == ["512 kpps"] * 3


def test_what_the_container_sent_is_in_the_metrics_unit():
    profile = {"sent_pps": 100_200.0, "sent_bps": 38.24e9}
    assert rate(TCP4, profile) == "38.2 Gbit/s" and rate(UDP6, profile) == "100 kpps"
    assert rate(TCP4, {}) == "?"  # a profile from before the rates were taken


def test_measured_container_variables_come_before_and_go_after_the_commands():
    got = with_measured(Endpoint("sg0123", 7, "10.77.0.1", "fd77::1"), "add rule inet t c ip saddr $measured_ipv4\n")
    assert got.splitlines() == ['redefine measured_iif = "sg0123"', "redefine measured_ipv4 = 10.77.0.1",
                                "redefine measured_ipv6 = fd77::1", "add rule inet t c ip saddr $measured_ipv4",
                                "undefine measured_iif", "undefine measured_ipv4", "undefine measured_ipv6"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_variants_files_parse(path):
    variants = parse_variants(path.read_text(), str(path))
    assert any(not v.commands for v in variants), "each file carries B again, to gauge its run's noise"
    assert all(v.commands for v in variants if v.name != "again")


_FORWARD_PREFIX = "add rule inet sockgate forward "


def _rewritten_forward(path: Path) -> list[tuple[str, list[str]]]:
    """Each variant of a shipped file that writes the forward chain out again: its
    name and the rules it adds there."""
    return [(v.name, [c.removeprefix(_FORWARD_PREFIX) for c in v.commands if c.startswith(_FORWARD_PREFIX)])
            for v in parse_variants(path.read_text(), str(path))
            if "flush chain inet sockgate forward" in v.commands]


@pytest.mark.parametrize("path", [p for p in SHIPPED if _rewritten_forward(p)], ids=lambda p: p.name)
def test_a_rewritten_forward_chain_still_mirrors_the_product_but_for_the_tx_lookups(path):
    # A variant that rewrites `forward` measures one change against the table as it
    # is: when BASE_CHAINS["forward"] changes, such a file would silently measure
    # something else.
    product = BASE_CHAINS["forward"][1]
    kept = [r for r in product if "@tx4" not in r and "@tx6" not in r]
    assert len(kept) < len(product)
    for name, rules in _rewritten_forward(path):
        assert [r for r in rules if r in product] == kept, f"[{name}] no longer mirrors BASE_CHAINS['forward']"
        assert not any("@tx4" in r or "@tx6" in r for r in rules), f"[{name}] keeps a tx lookup"


def test_rewritten_before_routing_chains_keep_the_products_fragment_rules():
    # [fragment-rules-only] measures what the rules after the fragment tests cost: it
    # must keep those tests exactly as the product renders them.
    checked = 0
    for chain in ("before_routing4", "before_routing6"):
        product = [r for r in REGULAR_CHAINS[chain] if r.endswith('comment "drop:fragment"')]
        prefix = f"add rule inet sockgate {chain} "
        for path in SHIPPED:
            for v in parse_variants(path.read_text(), str(path)):
                if f"flush chain inet sockgate {chain}" in v.commands:
                    rules = [c.removeprefix(prefix) for c in v.commands if c.startswith(prefix)]
                    assert rules == product, f"[{v.name}] no longer mirrors REGULAR_CHAINS[{chain!r}]' fragment rule"
                    checked += 1
    assert len(product) == 1 and checked >= 2
