"""Runtimes that execute a model: the torch continuous-batching engine and llama.cpp."""
