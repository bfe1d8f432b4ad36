# The two commands of the README: `make demo` (the main job) and `make test`.
# Both run `make setup` first; a second setup finds everything in place and installs nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint env device-kit

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo_job.py

# Two workers (the CI machine's cores), each taking whole files (their module fixtures built once).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile

lint: setup
	$(PY) -m flake8 projects tests tools train_net.py demo scripts
	$(PY) -m isort --check-only --diff projects tests tools train_net.py demo scripts

env: setup
	$(PY) -m saltnet.utils.collect_env

# .device/: the offline wheels tools/device/check.sh installs on a GPU machine (DEVELOPERS.md).
device-kit:
	$(PYTHON) scripts/build_device_kit.py
