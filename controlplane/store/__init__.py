"""modelpool's one etcd module: the only code that imports the etcd client library.

    EtcdConfig      endpoints, prefix, TLS/mTLS, user/password (flags or MODELPOOL_ETCD*)
    EtcdStore       get / put / delete / list_prefix with revisions, guarded transactions
    LeaseSession    one lease per process: keepalive vs. expiry with jitter, re-grant on loss
    watch_prefix    list-then-watch that resyncs after compaction or a broken stream
"""

from controlplane.store.client import Cmp, EtcdStore, KeyValue, Op
from controlplane.store.config import EtcdConfig, EtcdConfigError
from controlplane.store.errors import LeaseLost, StoreAuthError, StoreError, StoreUnavailable, TxnConflict
from controlplane.store.lease import LeaseSession
from controlplane.store.watch import Change, Changes, Resync, WatchUpdate, watch_prefix

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
    "Op",
    "Resync",
    "StoreAuthError",
    "StoreError",
    "StoreUnavailable",
    "TxnConflict",
    "WatchUpdate",
    "watch_prefix",
]
