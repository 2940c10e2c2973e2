"""Avalanche integration (the only package that imports avalanche; `import cil` does not import this).

- `GSAPlugin`: GSA inside an Avalanche strategy (cil/avalanche/plugin.py).
- `MKDPlugin`: MKD's EMA teachers inside an Avalanche strategy (cil/avalanche/mkd_plugin.py).
- `DERPPPlugin`, `PCRPlugin`, `OCMPlugin`, `OnProPlugin`, and `MethodPlugin(name)` for any of our methods: our
  method's own step inside an Avalanche strategy (cil/avalanche/method_plugin.py).
- `CCLDCPlugin`: the CCL-DC add-on on the method of one of those plugins (cil/avalanche/ccl_dc_plugin.py).
- `GradientMassMetric`: our diagnostics' per-class logit-gradient masses, new vs replay, as an Avalanche metric
  (cil/avalanche/diagnostics_metric.py).
- `method=avalanche_<name>`: Avalanche's own strategies on our streams, through our learner (cil/avalanche/peers.py).
`cil.avalanche.peers` imports avalanche only when a strategy is built, so the runner can read the peers' configs
without paying Avalanche's import time; the plugins import it on first use. See docs/avalanche.md.
"""

# name -> the module that defines it (imported on first use: importing avalanche takes seconds)
_HOMES = {
    "GSAPlugin": "plugin",
    "task_of": "plugin",
    "MKDPlugin": "mkd_plugin",
    "MethodPlugin": "method_plugin",
    "DERPPPlugin": "method_plugin",
    "PCRPlugin": "method_plugin",
    "OCMPlugin": "method_plugin",
    "OnProPlugin": "method_plugin",
    "CCLDCPlugin": "ccl_dc_plugin",
    "GradientMassMetric": "diagnostics_metric",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'cil.avalanche' has no attribute {name!r}")


__all__ = [
    "CCLDCPlugin",
    "DERPPPlugin",
    "GSAPlugin",
    "GradientMassMetric",
    "MKDPlugin",
    "MethodPlugin",
    "OCMPlugin",
    "OnProPlugin",
    "PCRPlugin",
    "task_of",
]
