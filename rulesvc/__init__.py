"""rulesvc: events in, JSON rulesets decide, channel plugins deliver."""

__version__ = "0.1.0"
