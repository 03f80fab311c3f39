"""Maintenance scripts (a package so that ``scripts.workflow_source`` imports the same from tests and tools)."""
