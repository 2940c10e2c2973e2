"""`python tests/_interrupt_cli.py WHERE:N:ACTION [cli overrides...]` runs `python -m cil` unchanged, except that
at the N-th occurrence (1-based, counted in this process) of WHERE the process sends itself SIGKILL (ACTION=KILL)
or SIGTERM (TERM), sets the model's weights to NaN (NAN, a diverged update) or sleeps (SLEEP, a run that holds its
folder for a while: until the file $CIL_TEST_RELEASE exists, at most 60 s), where WHERE is one of:

  observe  inside a method's update of an incoming batch (after the optimizer step, before the buffer add)
  batch    after the learner's loop body for a batch (any method, Avalanche peers too)
  eval     inside an evaluation (anytime or end of task), after the model went to eval mode
  saved    right after a checkpoint was renamed into place
  writing  while a checkpoint is written: the temporary file is complete but not yet renamed

Used by tests/test_resume.py to interrupt real CLI runs at chosen points.
"""

import os
import signal
import sys
import time

import cil.core.learner
import cil.run.checkpoint
import cil.runfolder
from cil.core.methods.base import Method

where, nth, action = sys.argv.pop(1).split(":")
nth = int(nth)
count = 0


def tick(method=None) -> None:
    global count
    count += 1
    if count != nth:
        return
    if action == "NAN":
        for p in method.model.parameters():
            p.data.fill_(float("nan"))
    elif action == "SLEEP":
        release, deadline = os.environ.get("CIL_TEST_RELEASE"), time.time() + 60
        while time.time() < deadline and not (release and os.path.exists(release)):
            time.sleep(0.05)
    else:
        os.kill(os.getpid(), getattr(signal, f"SIG{action}"))


def wrap(owner, name):
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        tick(getattr(self, "method", self))
        return out

    setattr(owner, name, wrapper)


if where == "observe":
    wrap(Method, "observe")
elif where == "batch":
    wrap(cil.core.learner.Learner, "train_batch")
elif where == "eval":
    original_predict = cil.core.learner.predict

    def predict(method, *args, **kwargs):
        method.model.eval()
        tick(method)
        return original_predict(method, *args, **kwargs)

    cil.core.learner.predict = predict
elif where == "saved":
    wrap(cil.run.checkpoint.Checkpointer, "save")
elif where == "writing":
    original_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(cil.runfolder.CHECKPOINT):
            tick()
        return original_replace(src, dst)

    cil.run.checkpoint.os.replace = replace
else:
    raise SystemExit(f"unknown interruption point {where!r}")

from cil.__main__ import cli  # noqa: E402  (after the patches)

cli()
