"""The engine: how each job moves from submitted to done (see _scheduler)."""
