"""Flows that ship with skiplock."""
