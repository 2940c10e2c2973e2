"""Avalanche integration (the only package that imports avalanche; `import cil` does not import this).

- `GSAPlugin`: GSA inside an Avalanche strategy (cil/avalanche/plugin.py).
- `MKDPlugin`: MKD's EMA teachers inside an Avalanche strategy (cil/avalanche/mkd_plugin.py).
- `method=avalanche_<name>`: Avalanche's own strategies on our streams, through our learner (cil/avalanche/peers.py).
`cil.avalanche.peers` imports avalanche only when a strategy is built, so the runner can read the peers' configs
without paying Avalanche's import time; the plugins import it on first use. See docs/avalanche.md.
"""


def __getattr__(name: str):
    if name in ("GSAPlugin", "task_of"):
        from cil.avalanche import plugin

        return getattr(plugin, name)
    if name == "MKDPlugin":
        from cil.avalanche import mkd_plugin

        return mkd_plugin.MKDPlugin
    raise AttributeError(f"module 'cil.avalanche' has no attribute {name!r}")


__all__ = ["GSAPlugin", "MKDPlugin", "task_of"]
