"""Seed 004's document pipeline as staged flows: parse -> chunk -> embed (`engine dev --example pipeline`)."""
