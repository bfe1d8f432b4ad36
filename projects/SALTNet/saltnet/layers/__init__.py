from .deform_conv import (
    DeformConv,
    ModulatedDeformConv,
    available_backends,
    get_default_backend,
    set_default_backend,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
