"""GSA inside Avalanche: a Naive strategy + GSAPlugin on Avalanche's own SplitMNIST, online (batches of 10).

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/avalanche_gsa_example.py [--data /work/shared/data] [--tasks N]

Runs offline: the MNIST .gz files are copied from --data (default $CIL_DATA_ROOT) into a temporary folder where
torchvision may extract them (the shared data root is read-only).
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.models import SimpleMLP
from avalanche.training import Naive

from cil.avalanche import GSAPlugin

p = argparse.ArgumentParser()
p.add_argument("--data", default=os.environ.get("CIL_DATA_ROOT", "data"))
p.add_argument("--tasks", type=int, default=5, help="train on the first N experiences only (a quick look)")
args = p.parse_args()
root = Path(tempfile.mkdtemp(prefix="mnist_"))
shutil.copytree(Path(args.data) / "MNIST" / "raw", root / "MNIST" / "raw")
torch.manual_seed(0)

# ---- the dozen lines a user writes ------------------------------------------------------------------------
benchmark = SplitMNIST(n_experiences=5, seed=0, dataset_root=root)  # Avalanche's random class order
model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
gsa = GSAPlugin(mem_size=500, num_classes=10, augment=False, two_views=False)  # MNIST: no crops, no flips
strategy = Naive(
    model=model,
    optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    train_mb_size=10,
    eval_mb_size=1000,
    plugins=[gsa],
    evaluator=None,
)
for exp in benchmark.train_stream[: args.tasks]:
    for sub_exp in split_online_stream([exp], experience_size=10, access_task_boundaries=True, seed=0):
        strategy.train(sub_exp)
    accs = [
        float(
            (
                strategy.model.eval()(torch.stack([x for x, *_ in te.dataset])).argmax(1)
                == torch.tensor(list(te.dataset.targets))
            )
            .float()
            .mean()
        )
        for te in benchmark.test_stream
    ]
    print(
        f"after task {exp.current_experience} (classes {sorted(exp.classes_in_this_experience)}): "
        f"test accuracy per task {[round(100 * a, 1) for a in accs]}"
    )
# ------------------------------------------------------------------------------------------------------------
print(
    "GSA weights by label:",
    dict(zip(gsa.summary()["classes"], [round(w, 3) for w in gsa.summary()["weights"]], strict=True)),
)
shutil.rmtree(root)
