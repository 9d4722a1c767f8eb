"""specroute bench replicas: sidecars that pool what they learn through Redis."""
