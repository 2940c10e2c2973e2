"""The runner: config schema and validation, building a run, the run folder, checkpoints, sweeps, the command
line, the demo and the benchmark."""
