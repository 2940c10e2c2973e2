"""The runner: config schema and validation, building a run, the run folder, checkpoints, sweeps, the command
line, the demo and the benchmark."""

import os
import sys

try:  # before torch is imported: its libraries cannot load from a deleted working directory (a crash, no message)
    os.getcwd()
except FileNotFoundError:
    print(
        "error: the working directory no longer exists (deleted or moved while this shell was in it); cd into an "
        "existing folder and run the command again",
        file=sys.stderr,
    )
    sys.exit(2)
