# make demo | make test | make bench: each builds .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cil-installed
# Offline copy of the datasets beside the checkout, when there is one; else the data root below.
CIL_DATA_ROOT ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),$(CURDIR)/data)
export CIL_DATA_ROOT

.PHONY: demo test check lint bench gpu-check gpu-queue gpu-bundle env clean-env

env: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints-cpu.txt
	@if ! $(PY) -c "import sys" 2>/dev/null; then \
	  echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); \
	  $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV); fi
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -c constraints-cpu.txt \
	  -e '.[dev,avalanche,tune,ray,wandb]'
	@# the bytecode pip would write, on every core (pip compiles on one; a few third-party files that are not
	@# Python 3 fail here as they fail silently in pip: nothing to report)
	@$(PY) -m compileall -j 0 -q $(VENV)/lib > /dev/null || true
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cil demo

# Lint and format (ruff), types (mypy), the import layers (import-linter; docs/architecture.md): before any test.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The whole suite (CI, and what a new user runs): two test workers with one thread each, as the tests start CLI
# runs of their own on a 2-core machine.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

# While working: lint, types and the fast tests (those not marked slow), in under two minutes.
check: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

# Sweeps on a real SLURM cluster (tests/test_slurm.py): a private one-node cluster (munged, slurmctld, slurmd in a
# temporary folder, removed afterwards) runs a sweep through Hydra's submitit launcher, pre-empts two of its jobs and
# checks that they resume. slurm-wlm and munge are installed with apt when missing (root, apt access). CI runs it
# after `make test`.
.PHONY: slurm-test
slurm-test: $(STAMP)
	$(PY) tests/slurm_cluster.py install
	CIL_SLURM_TEST=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=3 tests/test_slurm.py

# One intra-op thread per run unless OMP_NUM_THREADS says otherwise (the figures in docs/performance.md).
bench: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m cil bench $(BENCH_ARGS)

# On a GPU machine: its own PyTorch, no .venv needed (docs/gpu-check.md). OUT=DIR for the report folder;
# GPU_CHECK_ARGS for more (--budget S, --dry-run, --only ...).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m cil gpu-check $(if $(OUT),--out $(OUT)) $(GPU_CHECK_ARGS)

# The paper-scale runs of experiments/queue.yaml on a GPU machine, one budget at a time, resumable (docs/gpu-check.md,
# "The paper-scale queue"). OUT=DIR for the report folder; GPU_QUEUE_ARGS for more (--budget S, --pack FILE,
# --dry-run, --list, --only TABLES).
gpu-queue:
	$(if $(wildcard $(PY)),$(PY),python3) -m cil gpu-queue $(if $(OUT),--out $(OUT)) $(GPU_QUEUE_ARGS)

# What a lent GPU machine (offline, its own Python and PyTorch) needs beside the checkout, in .gpu/ (git-ignored;
# carried with the tree): the pure-Python wheels the command line needs and the CIFAR-10 JPEG copy (19 MB). Then
# OUT=... experiments/gpu_session.sh there (docs/gpu-check.md, "A lent GPU in one command").
gpu-bundle:
	rm -rf .gpu && mkdir -p .gpu/whl
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl hydra-core==1.3.8 omegaconf==2.3.1
	python3 -m pip wheel --quiet --no-deps -w .gpu/whl antlr4-python3-runtime==4.9.3
	tar -C $(CIL_DATA_ROOT) -czf .gpu/cifar10-jpeg.tar.gz cifar10-jpeg

clean-env:
	rm -rf $(VENV)
