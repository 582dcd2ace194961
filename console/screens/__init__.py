"""The console's screens: overview, failures, dead letters (each one key away), job detail, modals."""
