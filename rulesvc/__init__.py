"""rulesvc: events in, JSON rulesets decide, channel plugins deliver."""

from rulesvc.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]

__version__ = "0.1.0"
