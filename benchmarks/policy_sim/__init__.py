"""The policy simulator behind ``specroute bench policy``: worlds, scenarios, regret report."""
