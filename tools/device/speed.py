#!/usr/bin/env python
"""``tools/benchmark.py`` with every deformable conv of its models on one backend (step e of
``tools/device/check.sh``): FCOS and RetinaNet have none, so they run the same either way.

    python tools/device/speed.py --deform-backend triton --output speed_triton.json
    python tools/device/speed.py --deform-backend torchvision --smoke

Any other argument is ``tools/benchmark.py``'s.
"""

import argparse
import sys
from pathlib import Path

from saltnet.layers import BACKENDS, DeformConv, ModulatedDeformConv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark  # noqa: E402  (tools/ is not a package)


def on_backend(build, backend):
    """``build`` (num_classes -> model) with the model's deformable convs set to ``backend``."""

    def build_on_backend(num_classes):
        model = build(num_classes)
        for module in model.modules():
            if isinstance(module, (DeformConv, ModulatedDeformConv)):
                module.backend = backend
        return model

    return build_on_backend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deform-backend", choices=BACKENDS, required=True)
    args, rest = parser.parse_known_args(argv)
    for name, build in benchmark.MODELS.items():
        benchmark.MODELS[name] = on_backend(build, args.deform_backend)
    print(f"deformable-conv backend: {args.deform_backend}")
    return benchmark.main(rest)


if __name__ == "__main__":
    main()
