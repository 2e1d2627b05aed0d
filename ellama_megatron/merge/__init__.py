"""Weight merging of a base and an adapted model (linear, SLERP, task arithmetic), streamed shard by shard."""
