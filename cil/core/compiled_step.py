"""The compiled step (`compile_step=default|reduce-overhead`; docs/performance.md, "The compiled step").

A method with a compiled step (ER, ER-ACE, GSA) splits its update in two: host work (replay draws from the
buffer's host generator, task and class bookkeeping, augmentation draws) and one tensor function (model input,
the forward passes, the losses, GSA's statistics; autograd gives its backward). `StepCompiler` runs that function
eagerly (`none`) or through `torch.compile(fullgraph=True)`: `default` fuses it with inductor, `reduce-overhead`
also replays its forward and backward as CUDA graphs on a GPU (one launch each instead of hundreds). The optimizer
step stays eager (its foreach kernels are few launches already).

Shapes are not padded: the replay batch grows while the buffer fills and GSA's mixed batch changes share with the
seen classes, and padding those rows would change batch norm's statistics (so the results). Sizes are symbolic
instead, so a run compiles one graph per form of its step (ER, ER-ACE: one or two; GSA: two, before and after the
replay batch holds other tasks' rows), and CUDA graphs are recorded per size. The run's first step (an empty
buffer, met once) runs eagerly (`Method.run_step`).

Where capture is impossible (a method or setting without a compiled step, a function dynamo cannot trace whole, too
many recompilations) the eager function runs instead, and the log says why, once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

log = logging.getLogger("cil")

COMPILE_MODES = ("none", "default", "reduce-overhead")
RECOMPILE_LIMIT = 32  # GSA's step meets a few dozen shapes per run; past the symbolic recompile, guards on 0/1 sizes


# torch._dynamo is imported when a step is first compiled, not with the methods: it takes ~1.4 s, which every
# process that never compiles (a refused run, a report) would pay
def capture_errors() -> tuple[type[Exception], ...]:
    """What dynamo and inductor raise while tracing or compiling, before the step has run."""
    from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit, Unsupported

    return (Unsupported, BackendCompilerFailed, FailOnRecompileLimitHit)


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class StepCompiler:
    """Runs a method's step function eagerly or compiled (`mode`: one of COMPILE_MODES; `backend`: torch.compile's,
    `aot_eager` in tests: the same graph capture without code generation, so results equal eager's bit for bit)."""

    def __init__(self, mode: str = "none", backend: str = "inductor", device_type: str = "cpu") -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile_step must be one of {COMPILE_MODES}, got {mode!r}")
        self.mode, self.backend = mode, backend
        self.compiled: dict[Callable[..., Any], Callable[..., Any]] = {}  # by function
        self.eager_reason: str | None = None  # set when the step falls back to eager
        self.skips_seen, self.said_skips = (cudagraph_skips() if mode != "none" else 0), False
        self.device_type = device_type  # the run's device: "cpu" never has CUDA graphs

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.eager_reason is None

    def fall_back(self, reason: str) -> None:
        """Run every step function eagerly from now on, and say why (once per run)."""
        if self.eager_reason is None and self.mode != "none":
            self.eager_reason = reason
            log.warning("compile_step=%s: the eager step runs instead: %s", self.mode, reason)

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, compiled when active. `fn` computes from its tensor arguments and never changes them, and
        returns a tuple of tensors (or None)."""
        # a dispatch mode (the FLOP counter's sampled steps) sees only eager operators
        if not self.active or is_in_torch_dispatch_mode():
            return fn(*args)
        compiled = self.compiled.get(fn)
        if compiled is None:
            options: dict[str, Any] = {  # torch's overloads do not list the recompile keys yet
                "fullgraph": True,
                "backend": self.backend,
                "mode": None if self.mode == "default" or self.backend != "inductor" else self.mode,
                "recompile_limit": RECOMPILE_LIMIT,
                "dynamic": True,  # sizes symbolic from the first graph: GSA compiles 2 graphs per run instead of 7
                "isolate_recompiles": True,  # another run's (or method's) graphs do not count against this one
            }
            compiled = self.compiled[fn] = torch.compile(fn, **options)
            # the backward graph compiled with the forward one, so a failure is raised below, before the step ran
            # (lazily it would come from loss.backward(), after the forward pass had moved batch norm's statistics).
            # Process-wide: a context manager around every call costs ~50 us, a tenth of a graphed step.
            import torch._functorch.config as functorch_config

            functorch_config.force_non_lazy_backward_lowering = True
        # views (the stream's label slices) as copies: a slice at offset 0, a task's first batch, costs its own graph
        args = tuple(a.clone() if isinstance(a, torch.Tensor) and a._base is not None else a for a in args)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        try:
            out = compiled(*args)
        except capture_errors() as err:  # raised while tracing or compiling, before the step ran: nothing happened
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.fall_back(f"{getattr(fn, '__qualname__', fn)} cannot be compiled whole ({first})")
            return fn(*args)
        if self.mode == "reduce-overhead":  # CUDA graph outputs live until the next replay; the loop keeps some longer
            out = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
            self._say_skips()
        return out

    def _say_skips(self) -> None:
        """Say once when inductor compiled a graph of the step without CUDA graphs (on a CPU always)."""
        skips = cudagraph_skips()
        if skips > self.skips_seen and not self.said_skips:
            self.said_skips = True
            log.warning(
                "compile_step=reduce-overhead: a graph of the step runs compiled but without CUDA graphs (%s)",
                "no CUDA device" if self.device_type != "cuda" else "torch's cudagraphs warning says why",
            )
        self.skips_seen = skips
