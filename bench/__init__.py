"""ringpar benchmarks: JAX vs torch_xla, async vs sync, bytes vs the ring minimum, compile growth.

Run ``python -m bench``. Benchmarks report ratios measured in one run; tests never assert times.
"""
