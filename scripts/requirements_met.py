"""Exit 0 when every requirement in a requirements file is installed at an allowed version.

Used by ``scripts/setup_env.sh`` so that a second ``make setup`` needs no network: pip itself
would consult the package index even when nothing is missing.
"""

import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement


def unmet_requirements(path):
    """Return the lines of ``path`` whose requirement is missing or at a disallowed version."""
    unmet = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{line} (missing)")
                continue
            if not req.specifier.contains(version, prereleases=True):
                unmet.append(f"{line} (found {version})")
    return unmet


if __name__ == "__main__":
    missing = unmet_requirements(sys.argv[1])
    for line in missing:
        print(f"[setup]   unmet: {line}")
    sys.exit(1 if missing else 0)
