"""Erasus."""
