"""``specroute bench classifier``: the task classifier on the built-in world's corpus."""
