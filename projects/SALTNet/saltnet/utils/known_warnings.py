"""Known, harmless third-party warnings that every run would otherwise print.

Each entry is matched by its message and by the module it is attributed to, so the same text
raised from anywhere else, and every other warning, still shows. ``saltnet`` installs these
filters when it is imported, before it imports detectron2; the entry points (``train_net.py``,
the demos and tools) import ``saltnet`` first for that reason, and processes they spawn re-run
those imports.
"""

import warnings

# (message regex, category, module regex): the module is the one the warning is attributed to.
KNOWN_WARNINGS = (
    # detectron2 scripts a few functions at import time; torch deprecates torch.jit.script.
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
    # detectron2's LazyConfig loader and model zoo import pkg_resources (pinned: setuptools<82).
    (
        r"pkg_resources is deprecated as an API",
        UserWarning,
        r"detectron2\.(config\.lazy|model_zoo\.model_zoo)",
    ),
)


def ignore_known_warnings():
    """Add an "ignore" filter for each entry of :data:`KNOWN_WARNINGS` (idempotent)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
