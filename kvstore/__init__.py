"""The prefix-hash index: block hash -> (worker, physical block, token ids).

Never on the per-token path: the scheduler keeps its own in-memory view and writes through here in
batches (write-behind), so that the index survives a scheduler restart and can be shared.
"""

from kvstore.base import PrefixEntry, PrefixStore, StoreBatch, open_store, worker_key

__all__ = ["PrefixEntry", "PrefixStore", "StoreBatch", "open_store", "worker_key"]
