"""sockgate's own netlink clients, on one message/attribute layer and socket base (core).

Clients: route (the rtnetlink requests of an ADD), nftables (one attachment's set
elements), nfnotify (nf_tables change notifications), conntrack (ctnetlink), sockdiag
(inet_diag). Import the client you need: this package imports none of them, so the
CNI executable loads only what its path uses. Design notes: docs/netlink.md.
"""
