#!/usr/bin/env python
"""``tools/benchmark.py`` with every deformable conv of its models on one backend (step
model_speed of ``tools/device/check.py``): FCOS and RetinaNet have none, so they run the same
either way (``--deformable-only`` leaves them out).

    python tools/device/speed.py --deform-backend triton --output speed_triton.json
    python tools/device/speed.py --deform-backend gather --deformable-only --smoke

Any other argument is ``tools/benchmark.py``'s.
"""

import argparse
import sys
from pathlib import Path

from saltnet.layers import BACKENDS, DeformConv, ModulatedDeformConv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark  # noqa: E402  (tools/ is not a package)

# benchmark.MODELS with SALT (deformable convs): SALT-Net and the plug-ins.
DEFORMABLE_MODELS = [name for name in benchmark.MODELS if "SALT" in name]


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
    parser.add_argument("--deformable-only", action="store_true",
                        help="only the models with deformable convs (SALT-Net, the plug-ins)")
    args, rest = parser.parse_known_args(argv)
    for name, build in benchmark.MODELS.items():
        benchmark.MODELS[name] = on_backend(build, args.deform_backend)
    if args.deformable_only:
        rest += ["--models", *DEFORMABLE_MODELS]
    print(f"deformable-conv backend: {args.deform_backend}")
    return benchmark.main(rest)


if __name__ == "__main__":
    main()
