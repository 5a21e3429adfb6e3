"""Replaying events on a virtual clock with the live rulesets: the simulator."""
