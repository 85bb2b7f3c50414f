# Quick start: `make demo` and `make test` on a fresh machine with Python >= 3.10.
# TORCH picks the PyTorch build; override it for your own CUDA build, e.g.
#   make test TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.selfkd-installed

.PHONY: install demo test bench clean gpu-pack gpu-smoke lint

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/selfkd demo

# TEST_WORKERS: pytest-xdist processes (the test machines have 2 cores; 0: one process, no xdist). --dist loadfile
# keeps each test file on one worker, so a file's module-scoped fixtures (the trained runs its tests share) are built once;
# --no-loadscope-reorder hands out the files in tests/conftest.py's order, the slowest first (xdist's own order, by
# test count, put the few-test multi-process files last, where one of them alone kept a worker busy at the end).
# PYTEST_ARGS: more pytest options, e.g. make test PYTEST_ARGS="--durations=20" (the slowest tests).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/cifar10_cpu.py

# The GPU campaign (benchmarks/gpu.sh, README "Data larger than memory, and the GPU path").
# gpu-pack: what a machine without network needs beside its own python3 with torch: the wheels of
# selfkd's dependencies that the accelerator machine lacks (pydantic and its closure; numpy, pyyaml, tqdm,
# scikit-learn, pillow and matplotlib are there) for its Python and platform, into .whl/, and the
# CIFAR-10 JPEG archive, into .gpudata/ (both ignored by git; about 2.8 + 19.6 MB). The install is
# resolved offline from .whl/ alone as gpu.sh will do it, so a missing wheel fails here, not there.
GPU_PYTHON ?= 3.12
GPU_PLATFORMS := --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0
CIFAR10_JPEG ?= ../shared/data/cifar10-jpeg.tar.gz
CIFAR10_JPEG_SHA256 := c3b7ea4a07a6322fdbeec29447910a66959748cef6097757418b1c48806b2af4

gpu-pack:
	rm -rf .whl .whl.part && mkdir -p .whl.part .gpudata
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) $(GPU_PLATFORMS) \
		-d .whl.part $(GPU_WHEELS)
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null $(PYTHON) -m pip install --quiet --dry-run \
		--ignore-installed --no-index --find-links .whl.part --only-binary=:all: --python-version $(GPU_PYTHON) \
		$(GPU_PLATFORMS) --target .whl.part/.dry-run pydantic
	mv .whl.part .whl
	echo "$(CIFAR10_JPEG_SHA256)  $(CIFAR10_JPEG)" | sha256sum --check --quiet
	rm -f .gpudata/cifar10-jpeg.tar.gz && cp $(CIFAR10_JPEG) .gpudata/cifar10-jpeg.tar.gz
	du -ch .whl .gpudata | tail -1

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff==0.17.6 mypy==2.4.1 types-PyYAML==6.0.12.20261113 types-tqdm==4.70.0.20261106
	$(BIN)/ruff check selfkd tests benchmarks examples
	$(BIN)/mypy  # the whole package (pyproject.toml [tool.mypy])

gpu-smoke: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu.sh --smoke

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
