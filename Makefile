# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check --no-warn-script-location

.PHONY: install emulators demo test test-fast test-reliability lint type-check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "make install: creating $(VENV) with curate-worker and its pinned dependencies (torch, timm,"
	@echo "  prefect, ...; about 4 minutes on a fresh machine, 5.5 GB; pip's log: $(VENV)/install.log)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e ".[dev,ray]" > $(VENV)/install.log 2>&1 \
		|| { grep -v "^WARNING: Location" $(VENV)/install.log; exit 1; }
	$(PY) -m pip install $(PIP_QUIET) --no-deps -c constraints.txt lightly==1.6.0  # see pyproject
	$(PY) -c "import flows.cli, tasks.embed, tasks.train, lightly.loss, kornia.augmentation, prefect_ray"
	touch $@
	@echo "make install: done ($(VENV)/bin/curate)"

# Azurite, the Azure Blob emulator the tests start (moto and fake-gcs-server come with pip).
emulators: infra/azurite/node_modules/.installed

infra/azurite/node_modules/.installed: infra/azurite/package-lock.json
	npm ci --prefix infra/azurite --no-audit --no-fund > infra/azurite/npm.log 2>&1 \
		|| { cat infra/azurite/npm.log; exit 1; }
	touch $@

demo: install
	@echo "make demo: curating generated sample images and videos (demo-data/) into demo-output/"
	$(PY) -m flows.demo

test: install emulators lint type-check
	$(PY) -m pytest -q -n auto --dist worksteal

test-fast: install emulators
	$(PY) -m pytest -q -m "not slow"

# Hostile inputs, faults, load and secrets alone; ends with the line of inputs tried,
# faults injected and objects lost.
test-reliability: install emulators
	$(PY) -m pytest -q -n auto --dist worksteal -m reliability

lint: install
	$(VENV)/bin/ruff check flows tasks tests bench
	$(VENV)/bin/ruff format --check flows tasks tests bench

type-check: install
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench.bench_embed
	$(PY) -m bench.bench_s3_read
	$(PY) -m bench.bench_video
	$(PY) -m bench.bench_incremental
	$(PY) -m bench.bench_fixed_cost
	$(PY) -m bench.bench_select
	$(PY) -m bench.bench_train
	$(PY) -m bench.bench_ray
	$(PY) -m bench.bench_throughputs  # refreshes tasks/throughputs.json (curate recommend)

clean:
	rm -rf demo-output demo-data .pytest_cache .mypy_cache .ruff_cache
