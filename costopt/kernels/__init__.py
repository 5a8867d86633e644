"""Native CPU kernels for quantized decode (`ops`: INT8, INT4, W8A8 GEMMs, compiled on first use) and their timing harness (`bench`, `python -m costopt.kernels`)."""
