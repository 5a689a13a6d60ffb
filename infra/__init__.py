"""Shared infrastructure below every other layer: the config system."""
