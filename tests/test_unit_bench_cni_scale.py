"""`bench-cni --attached N`: block order, agent log parsing and the summary (pure logic)."""
import json
import math

import pytest

from runtime.bench.cni_cli import build_parser
from runtime.bench.cni_scale import block_order, handled_ms, loads_ms, mode_order, summarize


def test_block_order_alternates_in_pairs():
    assert block_order(1, 1000) == [10, 1000]
    assert block_order(2, 1000) == [10, 1000, 1000, 10]
    assert block_order(3, 500) == [10, 500, 500, 10, 10, 500]
    # Switches (fill or drain) only between different neighbours: rounds - 1 + 1.
    order = block_order(4, 1000)
    assert sum(a != b for a, b in zip(order, order[1:])) == 4


def test_mode_order_alternates_between_blocks():
    assert mode_order(0) == ("sequential", "parallel")
    assert mode_order(1) == ("parallel", "sequential")
    assert mode_order(2) == mode_order(0)


def _line(msg: str, logger: str = "sockgate.agent") -> str:
    return json.dumps({"ts": "t", "level": "info", "logger": logger, "msg": msg})


def test_handled_ms_reads_successful_requests_only():
    lines = [
        _line("ADD m0s-0001/eth0 rc=0 in 12.5 ms"),
        _line("DEL m0s-0001/eth0 rc=0 in 3.0 ms"),
        _line("ADD m0s-0002/eth0 rc=7 in 1.0 ms"),           # failed
        _line("ADD m0s-0003/eth0 rc=0 in 9.0 ms; answer not delivered, the client hung up (x)"),  # not served
        _line("ADD m0s-0004/eth0 rc=0 in 5.0 ms", logger="sockgate.other"),
        _line("CHECK m0s-0001/eth0 rc=0 in 1.0 ms"),
        _line("ADD m0s-0005/eth0 rc=0 in abc ms"),
        "not json", "{broken", json.dumps(["a list"]),
    ]
    got = handled_ms(lines)
    assert got == {"ADD": {"m0s-0001": 12.5}, "DEL": {"m0s-0001": 3.0}}


def _block(config, mode, add, dele, agent_add=(), agent_del=()):
    return {"config": config, "mode": mode, "seconds": {"ADD": [v / 1000 for v in add], "DEL": [v / 1000 for v in dele]},
            "agent_ms": {"ADD": list(agent_add), "DEL": list(agent_del)}}


def test_summarize_ratios_target_and_noise():
    blocks = [
        _block(10, "sequential", [10, 20, 30], [10, 10, 10], [5, 5], [2]),
        _block(10, "parallel", [40], [40]),
        _block(1000, "parallel", [44], [100]),
        _block(1000, "sequential", [22, 22, 22], [11, 12, 13], [6], [3]),
        _block(1000, "sequential", [22, 24, 26], [11, 12, 13]),
        _block(1000, "parallel", [48], [100]),
        _block(10, "parallel", [40], [40]),
        _block(10, "sequential", [20, 20, 20], [10, 10, 10]),
    ]
    rep = summarize(blocks, 1000)
    seq_add_10 = rep["results"]["10/sequential/ADD"]
    assert seq_add_10["n"] == 6 and seq_add_10["p50"] == pytest.approx(20.0)
    assert seq_add_10["blocks_p50"] == [pytest.approx(20.0), pytest.approx(20.0)]
    assert rep["results"]["1000/sequential/ADD"]["p50"] == pytest.approx(22.0)
    r = rep["ratios"]
    assert r["sequential/ADD"]["ratio"] == pytest.approx(1.1) and r["sequential/ADD"]["met"]
    assert r["sequential/ADD"]["agent_ratio"] == pytest.approx(6 / 5)
    assert r["sequential/DEL"]["ratio"] == pytest.approx(1.2) and r["sequential/DEL"]["met"]   # <= target
    assert r["parallel/ADD"]["ratio"] == pytest.approx(46 / 40) and r["parallel/ADD"]["met"]
    assert r["parallel/DEL"]["ratio"] == pytest.approx(2.5) and not r["parallel/DEL"]["met"]
    assert math.isnan(r["parallel/DEL"]["agent_ratio"])          # no agent-side samples
    assert rep["target"]["met"] == {"sequential": True, "parallel": False}
    assert not rep["target"]["met_all"]
    # Last block over the first of the same configuration, mode and op.
    assert rep["noise"]["1000/parallel/ADD"] == pytest.approx(48 / 44)
    assert rep["noise"]["1000/sequential/ADD"] == pytest.approx(24 / 22)
    assert rep["noise"]["10/sequential/ADD"] == pytest.approx(1.0)


def test_summarize_one_block_each_has_no_noise_and_empty_is_nan():
    rep = summarize([_block(10, "sequential", [10], [10]), _block(50, "sequential", [12], [30])], 50)
    assert rep["noise"] == {}
    assert rep["ratios"]["sequential/ADD"]["ratio"] == pytest.approx(1.2)
    assert math.isnan(rep["ratios"]["parallel/ADD"]["ratio"]) and not rep["ratios"]["parallel/ADD"]["met"]


def test_parser_attached_defaults_off():
    assert build_parser().parse_args([]).attached == 0
    assert build_parser().parse_args(["--attached", "1000"]).attached == 1000


def test_loads_ms_reads_the_agents_table_loads():
    lines = ['{"logger": "sockgate.policy", "msg": "nft table was loaded with the elements of 1000 attachment(s) '
             'in 85 ms"}',
             'not json', '{"msg": "nft table was loaded with the elements of x attachment(s) in 1 ms"}',
             '{"msg": "nft table was loaded with the elements of 3 attachment(s) in 4 ms"}']
    assert loads_ms(lines) == [(1000, 85.0), (3, 4.0)]
