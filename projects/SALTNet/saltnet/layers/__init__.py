from .deform_conv import (
    BACKENDS,
    DeformConv,
    DeformConvInputError,
    ModulatedDeformConv,
    available_backends,
)

__all__ = [
    "BACKENDS",
    "DeformConv",
    "DeformConvInputError",
    "ModulatedDeformConv",
    "available_backends",
]
