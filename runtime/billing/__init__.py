"""Billing: the nft accounting counters of every attachment, turned into an append-only
JSON Lines ledger (schema in README, "Billing"), exact across crashes.

- schema: the file format (names, record fields, times, attachment keys);
- session: what an attachment's next record says (deltas, counter_reset,
  counters_missing, counters_decreased);
- ledger: the files (lock, fsynced appends, torn tails, rotation, checkpoint cache);
- flush: what the node runs (the periodic flush, a DEL's final record);
- report: reading it back (sums per pod, container or attachment).
"""
