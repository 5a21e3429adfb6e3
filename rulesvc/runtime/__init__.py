"""The loops and I/O around the core: inbox, scheduler, fan-out, dispatcher, jobs, rulesets, workers."""
