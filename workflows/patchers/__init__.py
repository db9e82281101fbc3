"""Patchers: what happens to a drained node between Draining and Enabling."""
