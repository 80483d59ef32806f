"""The Corral SDK: one async implementation (client.py) and a thin sync facade (sync.py)."""
