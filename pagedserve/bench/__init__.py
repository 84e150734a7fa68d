"""Benchmarks: ``pagedserve bench throughput | scheduler | prefix | suite`` (``make bench``).

Every figure is printed beside a baseline measured in the same invocation, as a ratio, because
absolute numbers on shared CI machines are noisy."""
