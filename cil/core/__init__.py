"""The training core: data and streams, buffer, models, augmentation, objectives, methods, the online loop,
metrics and diagnostics. Imports nothing from the runner, the analysis or the Avalanche adapter."""
