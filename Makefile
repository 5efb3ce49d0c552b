# One short command each: setup, demo, serve, test, bench, lint.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned to the CPU build for development and CI (see constraints.txt); Dockerfile.gpu takes the GPU build.
CONSTRAINTS := -c constraints.txt
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup dcmtk system-deps demo serve test test-fast bench lint clean constraints

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e '.[postgres,train,dev]'
	# blast-ct supplies the DeepMedic definition for export, parity and benchmarks only; its other
	# requirements (tensorboard) are not needed for that, hence --no-deps.
	$(PIP) install -q $(CONSTRAINTS) --no-deps blast-ct==2.1.0
	touch $@

# dcmtk: storescu is the real DICOM client the demo and tests send with. Look for dcmtk's own tool: pynetdicom
# installs a Python app of the same name into the venv.
dcmtk:
	@if [ ! -x /usr/bin/storescu ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dcmtk >/dev/null; \
	fi

# For the tests also chromium + chromedriver (browser tests), postgresql (worklist tests), orthanc (a real PACS
# that AI results are sent back to) and dicom3tools (dciodvfy checks the SR and SEG written).
system-deps: dcmtk
	@if [ ! -x /usr/bin/chromedriver ] || ! command -v pg_ctlcluster >/dev/null || [ ! -x /usr/sbin/Orthanc ] || ! command -v dciodvfy >/dev/null; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver postgresql orthanc dicom3tools >/dev/null; \
	fi

# The main job: the service on the embedded defaults (SQLite, local Ray, CPU inference), the real head CT and
# generated chest X-rays sent with storescu, and the worklist printed before and after analysis.
demo: setup dcmtk
	$(VENV)/bin/triage demo

serve: setup
	$(VENV)/bin/triage serve

test: setup system-deps
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow and not integration"

# The spine by stage, then C-STORE ingest against Orthanc and dcmtk's storescp (same files, same client).
bench: setup system-deps
	$(PY) benchmarks/bench_spine.py
	$(PY) benchmarks/bench_ingest.py

lint: setup
	$(VENV)/bin/ruff check triage tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy triage

# Pin every package of the development install (after a change to pyproject.toml and a fresh make setup).
constraints: setup
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v -i '^torch==\|^triage'; \
	  echo 'torch==2.13.0'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf var test-artifacts reports .pytest_cache
