"""Precision routing across tiers of one model: the router (`router`) and the fit of its thresholds (`fit`)."""
