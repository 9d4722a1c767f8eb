"""The built-in world's task generators, one module per kind of source."""
