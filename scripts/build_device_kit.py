#!/usr/bin/env python
"""Builds ``.device/``: the wheels a CPython 3.12 x86_64 GPU image without network needs to run
``tools/device/check.sh`` (``make device-kit``; needs the package registries).

The image already holds torch, torchvision, triton, numpy, pillow, opencv, matplotlib, pyyaml,
tabulate, tqdm, portalocker and cloudpickle: none of them is in the kit, which holds

* detectron2's Python files from the wheel ``scripts/setup_env.sh`` installs, repackaged as a
  pure ``py3-none-any`` wheel without its compiled ``_C`` (a CPython 3.10 extension);
* ``KIT`` below, with the pins of ``requirements.txt``: binary wheels for cp312 manylinux where
  the registry has them, wheels built here for sdist-only packages;
* this project, as a wheel.

check.sh installs every wheel with ``--no-deps``: the kit is the complete list.
"""

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DETECTRON2_WHEEL = "sal-detectron2==0.7.2"  # the wheel scripts/setup_env.sh installs
# What an import of the project, train_net.py, the speed tools and pytest need beyond the image:
# detectron2's runtime requirements and what they import, TensorBoard for detectron2's event
# writer, pytest for the CUDA tests, setuptools for detectron2.model_zoo's pkg_resources.
KIT = [
    "fvcore", "iopath", "omegaconf", "hydra-core", "antlr4-python3-runtime==4.9.*", "yacs",
    "termcolor", "pycocotools", "setuptools", "tensorboard", "protobuf", "absl-py", "markdown",
    "werkzeug", "markupsafe", "pytest", "pluggy", "iniconfig", "pygments",
]
MAX_MB = 40


def _pinned(name: str) -> str:
    """``name`` with its requirements.txt pin, if it has one there."""
    bare = re.split(r"[=<>!~]", name)[0]
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if re.split(r"[=<>!~\s#]", line.strip())[0].lower() == bare.lower():
            return line.split("#")[0].strip()
    return name


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                   check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack_pure(wheel: Path, out_dir: Path) -> Path:
    """``wheel`` without its compiled extensions (``*.so``), tagged ``py3-none-any``."""
    dist, version = wheel.name.split("-")[:2]
    target = out_dir / f"{dist}-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for name in src.namelist():
            if name.endswith(".so") or name == record_name:
                continue
            data = src.read(name)
            if name.endswith(".dist-info/WHEEL"):
                text = re.sub(r"(?m)^Tag: .*\n", "", data.decode())
                text = re.sub(r"(?m)^Root-Is-Purelib: .*$", "Root-Is-Purelib: true", text)
                data = (text.rstrip("\n") + "\nTag: py3-none-any\n").encode()
            dst.writestr(name, data)
            records.append(_record_line(name, data))
        dst.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")
    return target


def build(out_dir: Path) -> list:
    """Fills ``out_dir`` (emptied first); returns the wheel names."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    binary = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              "--abi", "cp312", "--platform", "manylinux2014_x86_64", "--no-deps"]
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
             "-d", tmp, DETECTRON2_WHEEL)
        (wheel,) = Path(tmp).glob("*.whl")
        repack_pure(wheel, out_dir)
    for req in map(_pinned, KIT):
        try:
            _pip("download", *binary, "-d", str(out_dir), req)
        except subprocess.CalledProcessError:  # sdist only: build a wheel here
            _pip("wheel", "--no-deps", "-w", str(out_dir), req)
    _pip("wheel", "--no-deps", "-w", str(out_dir), str(REPO))
    wheels = sorted(p.name for p in out_dir.glob("*.whl"))
    size_mb = sum(p.stat().st_size for p in out_dir.iterdir()) / 1e6
    if size_mb > MAX_MB:
        raise SystemExit(f"{out_dir} holds {size_mb:.1f} MB, more than {MAX_MB} MB")
    print(f"{out_dir}: {len(wheels)} wheels, {size_mb:.1f} MB\n  " + "\n  ".join(wheels))
    return wheels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / ".device"), help="kit folder (emptied)")
    build(Path(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
