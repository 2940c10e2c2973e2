"""The compiled step (cil/core/compiled_step.py, `compile_step=default|reduce-overhead`): ER, ER-ACE and GSA give
the eager step's results when their step function runs through torch.compile(fullgraph=True), and a run that
cannot be captured falls back to the eager step and says so once.

Most runs here use the `aot_eager` backend: dynamo's capture and AOT autograd's forward/backward graphs (what
inductor and CUDA graphs consume) without code generation, so they must equal eager bit for bit. One run uses
inductor, whose generated kernels reassociate the log-softmax and the reductions (the loss differs in the last
bit or two): it is compared within 1e-5. CUDA graphs (`reduce-overhead`) need a GPU: docs/gpu-check.md."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from cil.core.compiled_step import StepCompiler
from cil.core.methods.er import ER
from cil.run.config import default_config
from cil.run.experiment import build_learner, load_run_dataset
from cil.schema import DatasetConfig

SAMPLES_PER_CLASS = 23  # 46 rows a task: 4 batches of 10 and one of 6 (a short batch, a new size mid-run)


@pytest.fixture(scope="module")
def digits():
    return load_run_dataset(default_config("er", dataset=DatasetConfig(name="digits")))


def learner_for(tmp_path, digits, method, compiler=None, model="mlp", **keys):
    """A whole Split digits run of `method` (5 tasks of 2 classes, 25 steps), its FLOP counter on every 7th step
    (a dispatch mode, under which the compiled step runs eagerly)."""
    cfg = default_config(method, dataset=DatasetConfig(name="digits"))
    cfg.buffer.size, cfg.log.progress, cfg.eval.anytime_every = 100, False, 0
    cfg.stream.samples_per_class, cfg.compute.flops_every = SAMPLES_PER_CLASS, 7
    cfg.model.name, cfg.model.nf, cfg.model.hidden = model, 4, [32]
    for key, value in keys.items():
        setattr(cfg.method, key, value)
    learner = build_learner(cfg, tmp_path / ("compiled" if compiler else "eager"), digits)
    if compiler is not None:
        learner.method.use_compiled_step(compiler)
    return learner


def run_both(tmp_path, digits, method, compiler, **keys):
    eager = learner_for(tmp_path, digits, method, **keys)
    compiled = learner_for(tmp_path, digits, method, compiler, **keys)
    counters.clear()
    return eager, eager.run(), compiled, compiled.run()


def states(learner):
    method = learner.method
    extra = {"buffer_y": method.buffer.y, "seen": method.seen}
    if method.name == "gsa":
        extra |= {"positive": method.gsa.stats.positive, "negative": method.gsa.stats.negative}
    return {**method.model.state_dict(), **extra}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, keys",
    [
        ("er", {}),
        ("er_ace", {}),  # one pass, the joint loss
        ("er_ace", {"separate_passes": True}),  # the official two passes
        ("gsa", {"warmup_batches": 2}),  # warm-up and weighted steps in every task
    ],
)
def test_compiled_step_equals_eager_bit_for_bit(tmp_path, digits, method, keys):
    """Whole runs, one eager, one through dynamo and AOT autograd: the same accuracy matrix, weights, batch-norm
    free parameters, buffer, seen classes (and GSA's statistics), bit for bit; every step captured whole
    (fullgraph=True: a graph break would have made the run fall back to eager, `eager_reason`)."""
    compiler = StepCompiler("default", backend="aot_eager")
    eager, a, compiled, b = run_both(tmp_path, digits, method, compiler, **keys)
    assert compiled.method.compiler is compiler and compiler.eager_reason is None
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile (the first step, no replay yet, runs eagerly)
    assert a["acc_matrix"] == b["acc_matrix"]
    for key, value in states(eager).items():
        assert torch.equal(value, states(compiled)[key]), key
    if method == "gsa":
        assert torch.equal(eager.method.gsa.last_weights, compiled.method.gsa.last_weights)
        assert not torch.equal(compiled.method.gsa.last_weights, torch.ones(10))  # weighted steps ran


@pytest.mark.slow
def test_inductor_step_equals_eager_within_rounding(tmp_path, digits):
    """ER through inductor (the code `compile_step=default` runs on a CPU): generated kernels reassociate sums, so
    weights agree to 1e-5 rather than bit for bit; the accuracy matrix is the same."""
    eager, a, compiled, b = run_both(tmp_path, digits, "er", StepCompiler("default"))
    assert compiled.method.compiler is not None and compiled.method.compiler.eager_reason is None
    assert a["acc_matrix"] == b["acc_matrix"]
    for key, value in states(eager).items():
        torch.testing.assert_close(value, states(compiled)[key], rtol=1e-5, atol=1e-6, msg=key)


def fallbacks(caplog):
    return [r for r in caplog.records if "the eager step runs instead" in r.getMessage()]


def test_a_method_without_compiled_step_falls_back_once(tmp_path, digits, caplog):
    """DER++ has no compiled step; ER with diagnostics neither (they read every loss term): each says so once."""
    caplog.set_level(logging.WARNING, logger="cil")
    learner = learner_for(tmp_path, digits, "derpp", StepCompiler("reduce-overhead", backend="aot_eager"))
    assert learner.method.compiler is None
    for i, batch in enumerate(learner.stream.batches()):
        if i == 3:
            break
        learner.train_batch(batch)
    assert [r.getMessage() for r in fallbacks(caplog)] == [
        "compile_step=reduce-overhead: the eager step runs instead: method derpp has no compiled step (ER, ER-ACE "
        "and GSA have one)"
    ]
    er = learner_for(tmp_path / "d", digits, "er")
    er.method.diagnostics = object()  # only its presence matters here
    er.method.use_compiled_step(StepCompiler("default"))
    assert er.method.compiler is None and "diagnostics" in fallbacks(caplog)[-1].getMessage()


def test_a_step_dynamo_cannot_capture_falls_back_once_with_eager_results(tmp_path, digits, caplog, monkeypatch):
    """A step function with a graph break cannot be captured whole: the first step says so once and every step
    runs the eager function, so the run equals the eager run."""
    caplog.set_level(logging.WARNING, logger="cil")
    plain = ER.step_loss

    def with_break(self, *args):
        torch._dynamo.graph_break()  # what a read-back or an untraceable call does to the graph
        return plain(self, *args)

    monkeypatch.setattr(ER, "step_loss", with_break)
    compiler = StepCompiler("default", backend="aot_eager")
    eager, a, compiled, b = run_both(tmp_path, digits, "er", compiler)
    assert len(fallbacks(caplog)) == 1 and "cannot be compiled whole" in fallbacks(caplog)[0].getMessage()
    assert compiler.eager_reason is not None
    assert a["acc_matrix"] == b["acc_matrix"]
    for key, value in states(eager).items():
        assert torch.equal(value, states(compiled)[key]), key


def test_config_switch_reaches_the_method(tmp_path, digits, caplog):
    """compile_step=... gives the run's method its compiler; an unknown mode or compile=true beside it is refused
    before anything is built."""
    from cil.errors import ConfigError

    cfg = default_config("gsa", dataset=DatasetConfig(name="digits"))
    cfg.compile_step, cfg.log.progress = "reduce-overhead", False
    learner = build_learner(cfg, tmp_path, digits)
    assert learner.method.compiler is not None and learner.method.compiler.mode == "reduce-overhead"
    assert learner.method.gsa.run_step == learner.method.run_step
    refused = [({"compile_step": "max"}, "compile_step"), ({"compile_step": "default", "compile": True}, "compile")]
    for bad, key in refused:
        cfg = default_config("er", dataset=DatasetConfig(name="digits"))
        for k, v in bad.items():
            setattr(cfg, k, v)
        with pytest.raises(ConfigError, match=key):
            build_learner(cfg, tmp_path, digits)
