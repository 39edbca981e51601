"""ringpar parity harness: runs the same cases on JAX and torch_xla and compares them.

Importing this package imports neither framework; the runner imports each lazily.
"""
