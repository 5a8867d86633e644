"""Runtimes that execute a variant: the torch continuous-batching engine (`engine`)."""
