"""specroute in front of a fleet of vLLM (OpenAI-compatible) replicas: each replica runs one
speculative configuration, and routing a prompt to a replica is choosing its drafter."""
