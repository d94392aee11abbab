"""Integrations with other libraries (imported on demand, so the app does not need them installed)."""
