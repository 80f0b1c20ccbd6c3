"""The API's limits, in one place: the server enforces them, the client and the docs quote them.

A request beyond a limit is refused with INVALID_ARGUMENT naming the limit; nothing is
truncated silently. (DEFAULT_TOP is what a CacheStatus call that sets no `top` gets.)
"""

from __future__ import annotations

__all__ = ["DEFAULT_TOP", "MAX_CANDIDATES", "MAX_K", "MAX_MESSAGE_BYTES", "MAX_QUERIES", "MAX_ROWS", "MAX_TOP"]

MAX_ROWS = 10_000  # entity rows per GetOnlineFeatures or Predict call
MAX_CANDIDATES = 10_000  # candidates per Rank call (retrieval: at most MAX_K)
MAX_K = 1000  # neighbours per SearchSimilar query
MAX_QUERIES = 10_000  # queries per SearchSimilar call
MAX_TOP = 10_000  # hot keys per CacheStatus call
DEFAULT_TOP = 20  # hot keys a CacheStatus call lists when it does not say
# Large batches (10,000 rows x many features) exceed gRPC's 4 MB default; server and
# client both raise their limits to this.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
