"""The store's status codes (defined with the machines' store vocabulary, ``session.storeops``)."""

from session.storeops import StoreStatus

__all__ = ["StoreStatus"]
