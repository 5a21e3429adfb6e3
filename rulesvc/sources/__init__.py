"""Shipped mappings of other systems' formats to ours (data files, read at start-up)."""
