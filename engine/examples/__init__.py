"""Example flows that ship with skiplock (`engine dev --example NAME` runs one end to end)."""
