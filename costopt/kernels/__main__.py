"""`python -m costopt.kernels`: time the quantized CPU kernels (see costopt.kernels.bench)."""
from costopt.kernels.bench import main

main()
