"""Triton kernel tests (interpreter on CPU, compiled on CUDA)."""
