"""Plugins that ship with rulesvc; `rulesvc.plugins` registers them before any entry point."""
