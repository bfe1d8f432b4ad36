"""Environment report: detectron2's own, plus where detectron2 came from and which
deformable-conv backend SALT-Net uses. Run ``python -m saltnet.utils.collect_env``."""

import os
from importlib import metadata

from detectron2.utils.collect_env import collect_env_info
from tabulate import tabulate

from ..layers import available_backends
from ..layers.deform_conv import detectron2_ops_available


def detectron2_origin() -> str:
    """Which distribution installed detectron2, and where it lives."""
    import detectron2

    location = os.path.dirname(detectron2.__file__)
    for dist_name in ("detectron2", "sal-detectron2"):
        try:
            version = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            continue
        return f"{dist_name}=={version} at {location}"
    return f"source checkout / unknown distribution at {location}"


def saltnet_env_info() -> str:
    rows = [
        ("detectron2 origin", detectron2_origin()),
        ("detectron2 compiled ops (_C)", "yes" if detectron2_ops_available() else "no"),
        ("deformable-conv backend", "MODEL.SALTNET.DEFORM_BACKEND (default auto)"),
        ("deformable-conv backends available", ", ".join(available_backends())),
    ]
    return tabulate(rows)


def collect_env() -> str:
    return collect_env_info() + "\nSALT-Net\n" + saltnet_env_info()


if __name__ == "__main__":
    print(collect_env())
