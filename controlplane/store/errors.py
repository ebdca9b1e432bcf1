"""Errors raised by the etcd store module.

    StoreError
     ├── StoreUnavailable      etcd cannot be reached (after the client's retries)
     ├── StoreAuthError        bad credentials or missing permission
     ├── TxnConflict           a guarded transaction's compare failed
     └── LeaseLost             an operation needed a lease that is gone
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error of the store module."""


class StoreUnavailable(StoreError):
    """etcd could not be reached within the configured timeout."""


class StoreAuthError(StoreError):
    """etcd refused our credentials or the user lacks permission."""


class TxnConflict(StoreError):
    """A transaction's compare did not hold: something changed since it was read."""


class LeaseLost(StoreError):
    """The lease an operation relied on has expired or was revoked."""
