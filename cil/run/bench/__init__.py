"""`python -m cil bench` (`make bench`): how fast is our online loop, against a bare PyTorch floor and Avalanche.

Every (workload, contestant, repeat) runs in its own fresh Python process, so peak memory is the contestant's own
and nothing (allocator caches, oneDNN kernels, thread pools) carries over; the runs are interleaved (repeat 1
of every contestant, then repeat 2, ..., each repeat in a rotated order) so that drift in the machine's load
falls on every contestant alike. Timing covers the training pass only. See docs/performance.md.
"""

from cil.run.bench.contestants import AVALANCHE, CONTESTANTS, OURS
from cil.run.bench.workloads import WORKLOADS

__all__ = ["AVALANCHE", "CONTESTANTS", "OURS", "WORKLOADS"]
