"""``specroute bench engine``: the speculative engine against plain decoding and transformers."""
