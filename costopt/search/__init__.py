"""The accuracy-target search: the cheapest passing candidate and the Pareto front (`frontier`), per-part sensitivity (`sensitivity`) and the measured per-part kernel cost (`costmodel`)."""
