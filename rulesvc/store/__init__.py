"""MongoDB: the store and its queries, the keys and inbox tokens, the embedded mongod."""
