"""The semantic cache's library: labeled prompt pairs, the verification step, the embedder and the
calibration that bounds the false-hit rate. No HTTP here; the gateway in `serving/` uses it."""
