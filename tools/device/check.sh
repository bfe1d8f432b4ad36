#!/usr/bin/env bash
# The one command for a GPU machine without network (DEVELOPERS.md, "GPU check"):
#
#   OUT=/some/folder bash tools/device/check.sh        # from the repository root, .device carried
#
# 1. installs the wheels of .device (`make device-kit`) with pip --no-index --no-deps into a
#    folder of its own ($KIT_SITE), never touching the image's torch, torchvision or triton;
# 2. runs tools/device/check.py with that folder and this tree's projects/SALTNet on PYTHONPATH
#    (so a fix made in the tree runs without rebuilding the kit), which writes $OUT/report.md,
#    $OUT/report.json and $OUT/check.log.
# Everything stays within 8 minutes on one H200: 30 s for the installation, then check.py's
# steps, essentials first, each under its own timeout and all within its budget (420 s), the
# report written before the first step and after each. Without CUDA the steps run at tiny
# sizes, with three times the timeouts (a CPU rehearsal).
set -uo pipefail
cd "$(dirname "$0")/../.."

say() { echo "[check] $*"; }

if [ -z "${OUT:-}" ]; then
  say "OUT is not set: export OUT=/folder/that/comes/back (the report is written there)"
  exit 2
fi
PYTHON=${PYTHON:-python3}
KIT=${KIT:-.device}
KIT_SITE=${KIT_SITE:-${TMPDIR:-/tmp}/saltnet_device_site}
mkdir -p "$OUT"

if ! ls "$KIT"/*.whl >/dev/null 2>&1; then
  say "no wheels in $KIT: build them with 'make device-kit' where the registries are reachable"
  exit 2
fi
rm -rf "$KIT_SITE"
start=$(date +%s)
say "installing $(ls "$KIT"/*.whl | wc -l) wheels of $KIT into $KIT_SITE with $($PYTHON --version)"
if ! timeout 30 "$PYTHON" -m pip --disable-pip-version-check install --no-index --no-deps \
    --no-compile --quiet --target "$KIT_SITE" "$KIT"/*.whl >"$OUT/install.log" 2>&1; then
  say "pip install failed (see $OUT/install.log); unpacking the wheels instead"
  timeout 30 "$PYTHON" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$KIT_SITE" "$KIT"/*.whl || exit 3
fi
say "installed in $(( $(date +%s) - start )) s"

export PYTHONPATH="$PWD/projects/SALTNet:$KIT_SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$KIT_SITE/bin:$PATH"
"$PYTHON" tools/device/check.py --out "$OUT" "$@"
status=$?
say "done in $(( $(date +%s) - start )) s, exit status $status; report: $OUT/report.md"
exit $status
