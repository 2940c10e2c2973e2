"""The paper protocols in two named modes: `gsa_<dataset>` (our corrected step, with the paper's class order and
input normalisation) and `gsa_<dataset>_official` (the official code's behaviour, each piece a switch). On a reduced
CIFAR-10 JPEG stream the official mode's head stops learning after task 0 exactly as the official code's does."""

import shutil

import pytest
import torch
from conftest import SHARED_DATA
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cil.run.cli import CONF_DIR  # importing the CLI registers the schemas with Hydra
from cil.run.experiment import build_learner

OFFICIAL = {"crop": "affine", "bn_extra_passes": True, "fresh_head_rows": True, "freeze_head_after_first_task": True}


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tinyimagenet"])
def test_both_modes_set_the_paper_protocol_and_only_official_sets_the_official_switches(dataset):
    corrected = compose_cfg(f"experiment=gsa_{dataset}")
    official = compose_cfg(f"experiment=gsa_{dataset}_official")
    for cfg in (corrected, official):
        assert cfg.stream.class_order == "natural" and cfg.dataset.normalize and cfg.dataset.name == dataset
        assert (cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr, cfg.method.replay_batch_size) == (
            "resnet18",
            "adam",
            0.001,
            64,
        )
    assert {k: getattr(official.method, k) for k in OFFICIAL} == OFFICIAL
    assert {k: getattr(corrected.method, k) for k in OFFICIAL} == {
        "crop": "torchvision",
        "bn_extra_passes": False,
        "fresh_head_rows": False,
        "freeze_head_after_first_task": False,
    }
    assert official.experiment == f"gsa_{dataset}_official"


@pytest.fixture(scope="module")
def jpeg_subset(tmp_path_factory):
    """The first 10 training and 10 test images of every class of the CIFAR-10 JPEG copy, in its own layout: the
    runs below use 10 per class, and decoding the whole copy would cost most of their time."""
    if not (SHARED_DATA / "cifar10-jpeg").is_dir():
        pytest.skip(f"offline data copy not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("jpeg")
    for split, n in (("train", 10), ("test", 10)):
        for folder in sorted((SHARED_DATA / "cifar10-jpeg" / split).iterdir()):
            (root / "cifar10-jpeg" / split / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir())[:n]:
                shutil.copy(f, root / "cifar10-jpeg" / split / folder.name / f.name)
    return root


def head_history(tmp_path, data_root, experiment):
    """Drive a reduced official-protocol run on the CIFAR-10 JPEG copy; the head after every batch."""
    cfg = compose_cfg(
        f"experiment={experiment}",
        "dataset=cifar10_jpeg",
        f"dataset.root={data_root}",
        "model=reduced_resnet18",
        "model.nf=4",
        "stream.samples_per_class=10",
        "buffer.size=100",
        "log.progress=false",
        "eval.anytime_every=0",
        "precision=fp32",  # the protocol's fp16 needs CUDA
    )
    learner = build_learner(cfg, tmp_path)
    head = learner.method.head
    history = []
    for batch in learner.stream.batches():
        learner.train_batch(batch)
        history.append(
            (
                batch.task,
                batch.step_in_task,
                head.weight.detach().clone(),
                head.bias.detach().clone(),
                head.weight.requires_grad,
            )
        )
    return learner, history


@pytest.mark.slow
def test_official_head_stops_learning_after_task_0_and_new_rows_are_fresh(tmp_path, jpeg_subset):
    learner, history = head_history(tmp_path, jpeg_subset, "gsa_cifar10_official")
    classes = {t.index: t.classes.tolist() for t in learner.stream.tasks}
    assert classes[0] == [0, 1] and classes[4] == [8, 9]  # the paper's (natural) class order
    end_of_task0 = max(i for i, h in enumerate(history) if h[0] == 0)
    w0, b0 = history[end_of_task0][2], history[end_of_task0][3]
    assert not torch.equal(history[0][2], w0), "the head learns during task 0"
    for i in range(end_of_task0 + 1, len(history)):
        task, step, w, b, trainable = history[i]
        assert not trainable
        before_w, before_b = history[i - 1][2], history[i - 1][3]
        fresh = classes[task] if step == 0 else []
        others = [c for c in range(10) if c not in fresh]
        # rows of every other class are exactly as they were: the optimizer no longer reaches the head
        assert torch.equal(w[others], before_w[others]) and torch.equal(b[others], before_b[others])
        if fresh:  # the new task's rows: a fresh default initialisation, not what they were
            bound = 1 / w.shape[1] ** 0.5
            assert not torch.equal(w[fresh], before_w[fresh]) and w[fresh].abs().max() <= bound
    final_w = history[-1][2]
    assert torch.equal(final_w[classes[0]], w0[classes[0]])  # task 0's rows: untouched since task 0 ended
    assert torch.equal(history[-1][3][classes[0]], b0[classes[0]])


@pytest.mark.slow
def test_corrected_mode_keeps_training_the_head(tmp_path, jpeg_subset):
    learner, history = head_history(tmp_path, jpeg_subset, "gsa_cifar10")
    end_of_task0 = max(i for i, h in enumerate(history) if h[0] == 0)
    assert history[-1][4]
    assert not torch.equal(history[-1][2][[0, 1]], history[end_of_task0][2][[0, 1]])
