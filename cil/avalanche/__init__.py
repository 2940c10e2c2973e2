"""Avalanche integration (the only package that imports avalanche; `import cil` does not import this).

- `GSAPlugin`: GSA inside an Avalanche strategy (cil/avalanche/plugin.py).
- `method=avalanche_<name>`: Avalanche's own strategies on our streams, through our learner (cil/avalanche/peers.py).
See docs/avalanche.md.
"""
from cil.avalanche.plugin import GSAPlugin, task_of

__all__ = ["GSAPlugin", "task_of"]
