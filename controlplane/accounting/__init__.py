"""Usage accounting in etcd: per-day counters whose etcd cost does not grow with traffic.

    blocks.py   Counts, Block, periods, UsageBlock encoding and parts (pure)
    compact.py  folding gone writers, old days and legacy records (pure plan + etcd shell)
    report.py   reading every usage record and summing by key/model, day, model or owner
    demand.py   the planner's demand from GatewayRecords (and legacy demand/ records)

The layout and its arithmetic are in docs/etcd-layout.md; the gateway side (UsageBook) is
gateway/usage.py.
"""
