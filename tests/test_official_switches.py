"""The switches that reproduce the official codes, each against an independent formulation: the affine crop, the
extra batch-norm passes, the head's fresh rows, ER-ACE's separate passes and the input normalisation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cil.core.augment import AffineCropAugment
from cil.core.buffer import ReplayBuffer
from cil.core.data.stream import Batch
from cil.core.methods.er_ace import ERACE, ERACEConfig
from cil.core.methods.gsa import GSA, GSAConfig
from cil.core.models import build_model


def test_affine_crop_is_affine_grid_with_half_pixel_offsets_and_reflection():
    aug = AffineCropAugment((16, 16), scale=(0.3, 1.0))
    g = torch.Generator().manual_seed(0)
    gray, boxes = aug.draw(500, 16, 16, g)
    h, w, cy, cx = boxes.unbind(1)
    # sizes are whole pixels, centres whole multiples of 1/16 (half a pixel in [-1, 1]) inside [s - 1, 1 - s]
    assert torch.allclose(h * 16, (h * 16).round()) and torch.allclose(cx * 16, (cx * 16).round())
    assert bool((cx.abs() <= 1 - w + 1e-6).all()) and bool((cy.abs() <= 1 - h + 1e-6).all())
    assert cx.unique().numel() > 10 and bool((h * w > 0.25).all())  # area >= 0.3 before rounding to pixels
    x = torch.rand(500, 3, 16, 16, generator=g)
    theta = torch.zeros(500, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = w, h, cx, cy
    grid = F.affine_grid(theta, (500, 3, 16, 16), align_corners=False)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    expected = F.grid_sample(
        torch.where(gray[:, None, None, None], luma, x),
        grid,
        mode="bilinear",
        padding_mode="reflection",
        align_corners=False,
    )
    torch.testing.assert_close(aug.apply(x, gray, boxes), expected)


def bn_step(bn_extra_passes: bool):
    torch.manual_seed(0)
    model = build_model("reduced_resnet18", (3, 8, 8), 4, nf=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = ReplayBuffer(50, (3, 8, 8), seed=1)
    g = torch.Generator().manual_seed(3)
    buf.add(torch.randint(0, 256, (30, 3, 8, 8), generator=g, dtype=torch.uint8), torch.tensor([0, 1] * 15), 0)
    buf.add(torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8), torch.tensor([2, 3] * 4), 1)
    m = GSA(
        model,
        opt,
        buf,
        GSAConfig(augment=False, bn_extra_passes=bn_extra_passes),
        4,
        torch.device("cpu"),
        input_shape=(3, 8, 8),
    )
    m.on_task_start(1, torch.tensor([2, 3]))
    m.classes.mark_seen(torch.arange(4), torch.arange(4))
    x = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.tensor([2, 3] * 5)
    loss, _ = m.gsa.loss(m.forward_float, x, y, 1, 7)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads, model.bn1.running_mean.clone(), model.bn1.num_batches_tracked.item()


def test_bn_extra_passes_move_only_the_running_statistics():
    """Without augmentation no random draw differs: the loss and every gradient are the same, batch norm's
    running statistics are not (the official step's passes outside the loss)."""
    loss0, grads0, mean0, n0 = bn_step(False)
    loss1, grads1, mean1, n1 = bn_step(True)
    torch.testing.assert_close(loss1, loss0)
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(a, b)
    assert n0 == 2 and n1 == 2 + 11  # the two loss passes, and P1, P3-P8 (6), P9, P10, P12, P13
    assert not torch.allclose(mean0, mean1)


def test_fresh_head_rows_are_nn_linear_init_and_clear_their_optimizer_state():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 6, hidden=(16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    m = GSA(model, opt, None, GSAConfig(), 6, torch.device("cpu"), input_shape=(1, 4, 4))
    model(torch.rand(3, 1, 4, 4)).sum().backward()
    opt.step()
    before_w = model.head.weight.detach().clone()
    m.refresh_head_rows([2, 5], torch.Generator().manual_seed(9))
    w, b = model.head.weight.detach(), model.head.bias.detach()
    bound = 1 / math.sqrt(16)
    assert torch.equal(w[[0, 1, 3, 4]], before_w[[0, 1, 3, 4]])
    assert not torch.equal(w[[2, 5]], before_w[[2, 5]]) and float(w[[2, 5]].abs().max()) <= bound
    assert float(b[[2, 5]].abs().max()) <= bound
    state = opt.state[model.head.weight]
    assert bool((state["exp_avg"][[2, 5]] == 0).all()) and bool((state["exp_avg"][[0, 1]] != 0).any())


def test_er_ace_separate_passes_against_two_forward_passes_by_hand():
    torch.manual_seed(0)
    model = build_model("reduced_resnet18", (3, 8, 8), 4, nf=4)
    reference = copy.deepcopy(model)
    buf = ReplayBuffer(40, (3, 8, 8), seed=1)
    g = torch.Generator().manual_seed(2)
    mem_x = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    buf.add(mem_x, torch.tensor([0, 1] * 10), 0)
    m = ERACE(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        buf,
        ERACEConfig(separate_passes=True),
        4,
        torch.device("cpu"),
        seed=3,
    )
    m.classes.mark_seen(torch.arange(4), torch.arange(4))
    x = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.tensor([2, 3] * 5)
    drawn = {}
    sample = buf.sample
    buf.sample = lambda n, **kw: drawn.setdefault("rows", sample(n, **kw))
    loss, _ = m.update(Batch(x, y, y, 1, 0, 0))
    rx, ry, _ = drawn["rows"]
    z_new = reference(x.float() / 255)  # the incoming rows alone: batch norm on their own statistics
    z_old = reference(rx.float() / 255)  # the replayed rows alone
    present = torch.full((4,), float("-inf"))
    present[[2, 3]] = 0
    expected = F.cross_entropy(z_new + present, y) + F.cross_entropy(z_old, ry)
    torch.testing.assert_close(loss, expected)
    joint = reference(torch.cat([x, rx]).float() / 255)
    wrong = F.cross_entropy(joint[:10] + present, y) + F.cross_entropy(joint[10:], ry)
    assert not torch.allclose(loss, wrong)  # the joint pass differs with batch norm: the switch matters


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalized_input_is_standardised_per_channel(channels_last):
    model = build_model("reduced_resnet18", (3, 4, 4), 2, nf=2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m = ERACE(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        None,
        ERACEConfig(),
        2,
        torch.device("cpu"),
        channels_last=channels_last,
        normalize=(mean, std),
    )
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(m.to_input(x), expected)
    assert m.to_input(x).is_contiguous(memory_format=torch.channels_last) == channels_last
