"""One attention interface, two backends: a torch reference (CPU, and the test oracle) and
Triton."""
