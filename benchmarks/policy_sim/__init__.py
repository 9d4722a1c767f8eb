"""The policy simulator behind ``specroute bench policy``: ground truth, scenarios, regret."""
