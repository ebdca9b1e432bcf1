"""modelpool's one etcd module: the only code that imports the etcd client library.

    EtcdConfig      endpoints, prefix, TLS/mTLS, user/password (flags or MODELPOOL_ETCD*)
    EtcdStore       get / put / delete / list_prefix with revisions, guarded transactions
    LeaseSession    one lease per process: keepalive vs. expiry with jitter, re-grant on loss
    watch_prefix    list-then-watch that resyncs after compaction or a broken stream
    WatchedCache    a typed copy of one prefix, run under the loop runner (store/cache.py)
"""

from controlplane.store.client import Cmp, EtcdStore, KeyValue, MemberStatus, Op
from controlplane.store.config import EtcdConfig, EtcdConfigError
from controlplane.store.errors import LeaseLost, StoreAuthError, StoreError, StoreUnavailable, TxnConflict
from controlplane.store.lease import LeaseSession
from controlplane.store.watch import Change, Changes, Progress, Resync, WatchUpdate, list_then_watch, watch_prefix

__all__ = [
    "Change",
    "Changes",
    "Cmp",
    "EtcdConfig",
    "EtcdConfigError",
    "EtcdStore",
    "KeyValue",
    "LeaseLost",
    "LeaseSession",
    "MemberStatus",
    "Op",
    "Progress",
    "Resync",
    "StoreAuthError",
    "StoreError",
    "StoreUnavailable",
    "TxnConflict",
    "WatchUpdate",
    "list_then_watch",
    "watch_prefix",
]
