"""Queue: the one owner of segment and bundle state, and the index that records it."""
