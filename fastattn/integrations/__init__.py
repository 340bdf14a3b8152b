"""Integrations of fastattn with model libraries (optional dependencies, imported lazily)."""
