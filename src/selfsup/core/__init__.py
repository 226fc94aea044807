"""The bottom layer: what every other part of selfsup builds on, importing nothing of selfsup itself.

errors (UserError), device (resolve_device, autocast, synchronize), machine (cores, memory, peak memory),
distributed (the process group and its collectives), seeds (RNG states, step seeds), io (the one atomic write,
the one reader of metrics.jsonl), progress (progress lines). tests/test_layers.py holds the order of the layers
above it.
"""
