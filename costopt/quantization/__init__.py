"""Quantization: the schemes behind one entry point (`schemes.quantize`), their run-time modules, the calibrated algorithms (GPTQ, AWQ, SmoothQuant) and the block-by-block capture they run on."""
