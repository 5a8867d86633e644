"""Serving workloads: the fixed, versioned request trace the load generator replays (`trace`)."""
