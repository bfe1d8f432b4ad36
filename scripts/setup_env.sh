#!/usr/bin/env bash
# Sets up the project-local virtual environment .venv, installing only what is missing:
#   1. torch + torchvision: an importable, working pair is kept; else torch==2.14.1 torchvision==0.29.1.
#   2. requirements.txt (detectron2's runtime requirements with their pins, and ours).
#   3. detectron2: an importable detectron2 (e.g. your source build) is never touched; else the
#      pure-Python detectron2 from the sal-detectron2==0.7.2 wheel (see DEVELOPERS.md).
#   4. this project, editable.
#   5. Debian's slurm-wlm and munge (the real Slurm cluster of tests/test_slurm.py), where missing
#      and this runs as root with apt-get; elsewhere those tests skip and say why.
# A second run finds everything in place, installs nothing and makes no network request.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PAIR="torch==2.14.1 torchvision==0.29.1"
DETECTRON2_WHEEL="sal-detectron2==0.7.2"
installed=()

say() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  installed+=("venv")
fi
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

# Each check is one interpreter start (importing torch takes seconds): it prints what it keeps.
if kept=$("$py" -c "import torch, torchvision as tv; tv.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print(torch.__version__, tv.__version__)" 2>/dev/null); then
  say "torch/torchvision: keeping $kept"
else
  say "torch/torchvision: installing $TORCH_PAIR"
  pip install $TORCH_PAIR
  installed+=("torch")
fi

if "$py" scripts/requirements_met.py requirements.txt; then
  say "requirements.txt: all met"
else
  say "requirements.txt: installing what is missing"
  pip install -r requirements.txt
  installed+=("requirements")
fi

if kept=$("$py" -c 'import detectron2, os; print(detectron2.__version__, "at", os.path.dirname(detectron2.__file__))' 2>/dev/null); then
  say "detectron2: keeping $kept"
else
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  say "detectron2: installing the pure-Python part of $DETECTRON2_WHEEL into $site"
  # After requirements.txt, and without dependencies: the wheel's metadata asks for numpy<2,
  # which detectron2's Python code does not need; pip checks declared dependencies only
  # when it resolves them, so this order keeps its resolver error out of the output.
  pip install --no-deps --only-binary=:all: --python-version 3.10 --target "$site" "$DETECTRON2_WHEEL"
  installed+=("detectron2")
fi

# Where "import saltnet" would load it from, without importing it (and torch with it).
if "$py" -c "import importlib.util as u, os, sys; spec = u.find_spec('saltnet')
sys.exit(spec is None or os.path.realpath(spec.origin) != os.path.realpath('projects/SALTNet/saltnet/__init__.py'))" \
    >/dev/null 2>&1; then
  say "saltnet: editable install in place"
else
  say "saltnet: installing this project (editable)"
  pip install --no-deps --no-build-isolation -e .
  installed+=("saltnet")
fi

if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
  say "slurm-wlm/munge: in place"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "slurm-wlm/munge: installing with apt-get (for tests/test_slurm.py)"
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
  apt_install || { apt-get update -q >/dev/null && apt_install; }
  installed+=("slurm-wlm")
else
  say "slurm-wlm/munge: missing, not root with apt-get: the real Slurm tests will skip"
fi

if [ ${#installed[@]} -eq 0 ]; then
  say "nothing to install: environment complete"
else
  say "installed: ${installed[*]}"
fi
