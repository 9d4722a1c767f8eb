"""``specroute bench fleet``: specroute in front of a fleet of vLLM replicas (CPU build)."""
