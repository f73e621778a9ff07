"""The perf-script parser behind `bench-dataplane --profile` (pure logic)."""
from runtime.bench.profile import forward_hook_share

IN_HOOK = """\
\tffffffff81f88c65 nft_counter_eval
\tffffffff81f8449a nft_lookup_eval
\tffffffff81f636a5 nft_do_chain
\tffffffff81f7e543 nft_do_chain_inet
\tffffffff81f28e13 nf_hook_slow
\tffffffff81ff8727 ip_forward
\tffffffff81e6651d __netif_receive_skb_one_core
"""
# The same function under another hook (prerouting's conntrack) is not sockgate's.
OTHER_HOOK = """\
\tffffffff81f00001 nf_conntrack_in
\tffffffff81f28e13 nf_hook_slow
\tffffffff81ff0001 ip_rcv
"""
# ip_forward itself, outside the hook.
FORWARD_ONLY = """\
\tffffffff81ff8727 ip_forward
\tffffffff81e6651d __netif_receive_skb_one_core
"""
IDLE = """\
\tffffffff81000001 pv_native_safe_halt
\tffffffff81000002 default_idle_call
\tffffffff81000003 do_idle
"""
V6 = IN_HOOK.replace(" ip_forward", " ip6_forward")


def test_counts_only_samples_inside_the_forward_hook():
    text = "\n".join([IN_HOOK, OTHER_HOOK, FORWARD_ONLY, IDLE, V6, OTHER_HOOK])
    got = forward_hook_share(text)
    assert (got.samples, got.in_hook, got.idle) == (6, 2, 1)
    assert got.share == 2 / 6 and got.busy == 5 / 6


def test_no_samples_is_zero_not_an_error():
    got = forward_hook_share("")
    assert (got.samples, got.share, got.busy) == (0, 0.0, 0.0)


# sockgate's `before_routing` chain: nft's inet hook function under prerouting.
IN_PREROUTING_CHAIN = """\
\tffffffff81f636a5 nft_do_chain
\tffffffff81f7e543 nft_do_chain_inet
\tffffffff81f28e13 nf_hook_slow
\tffffffff81ff0001 ip_rcv
"""


def test_counts_sockgates_prerouting_chain_but_not_conntracks_hooks():
    text = "\n".join([IN_HOOK, IN_PREROUTING_CHAIN, OTHER_HOOK, IN_PREROUTING_CHAIN.replace(" ip_rcv", " ipv6_rcv")])
    got = forward_hook_share(text)
    assert (got.samples, got.in_hook, got.in_prerouting) == (4, 3, 2)


# The segment meter's program (runtime/kernel/segment_meter.py), at either hook.
IN_METER = """\
\tffffffff81200001 copy_from_kernel_nofault
\tffffffff81200002 bpf_probe_read_kernel
\tffffffffc0001234 bpf_prog_6deef7357e7b4530_sg_segments
\tffffffff81f28e13 nf_hook_slow
\tffffffff81ff0001 ip_rcv
"""


def test_counts_the_segment_meter_at_prerouting_and_forward_as_sockgates():
    text = "\n".join([IN_METER, IN_METER.replace(" ip_rcv", " ip6_forward"), OTHER_HOOK, IN_PREROUTING_CHAIN])
    got = forward_hook_share(text)
    assert (got.samples, got.in_hook, got.in_prerouting, got.in_meter) == (4, 3, 1, 2)


# perf often can't unwind out of a JIT image: the program's frame, then the user stack.
IN_METER_UNWOUND = """\
\tffffffffc0001234 bpf_prog_6deef7357e7b4530_sg_segments
\t7f0000001234 __GI___libc_write
\t0 [unknown]
"""
# The call into the meter's program at prerouting, outside the program itself.
IN_METER_CALL = """\
\tffffffff81200003 nf_hook_run_bpf
\tffffffff81f28e13 nf_hook_slow
\tffffffff81ff0001 ipv6_rcv
"""


def test_counts_the_meter_where_perf_lost_its_hook_and_the_call_into_it():
    text = "\n".join([IN_METER_UNWOUND, IN_METER_CALL, IN_METER_CALL.replace(" ipv6_rcv", " ip6_forward"),
                      OTHER_HOOK, FORWARD_ONLY])
    got = forward_hook_share(text)
    # the forward hook's call is the hook's (and not the meter's); conntrack's isn't sockgate's
    assert (got.samples, got.in_hook, got.in_prerouting, got.in_meter) == (5, 3, 0, 2)
