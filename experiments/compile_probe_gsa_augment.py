"""Does torch.compile pay for GSA's augmentation bookkeeping (box sampling + sampling grids) on a CPU?
(docs/performance.md, "Where GSA's time goes")  OMP_NUM_THREADS=1 python experiments/compile_probe_gsa_augment.py"""

import time
import timeit

import torch

from cil.core.augment import _boxes_from_uniforms, crop_grid

torch.manual_seed(0)


def draw_and_grid(
    u,
):
    b = _boxes_from_uniforms(u[:, 1:11], u[:, 11:21], u[:, 21:], 28, 28, (0.6, 1.0), (3 / 4, 4 / 3))
    return b, crop_grid(b, (28, 28), (28, 28), torch.float32)


t0 = time.perf_counter()
cdg = torch.compile(draw_and_grid, dynamic=True)
u = torch.rand(160, 23)
out = cdg(u)
t1 = time.perf_counter()
print("compile+first call s", round(t1 - t0, 1))
for n in (150, 161, 170):
    t0 = time.perf_counter()
    cdg(torch.rand(n, 23))
    print("new shape", n, round(time.perf_counter() - t0, 3))
ref = draw_and_grid(u)
print("boxes equal", torch.equal(ref[0], out[0]), "grid max diff", float((ref[1] - out[1]).abs().max()))
print("eager us", min(timeit.repeat(lambda: draw_and_grid(u), number=200, repeat=3)) / 200 * 1e6)
print("compiled us", min(timeit.repeat(lambda: cdg(u), number=200, repeat=3)) / 200 * 1e6)
