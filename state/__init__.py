"""State stores on Redis: where the worker writes model state and serving reads it."""
