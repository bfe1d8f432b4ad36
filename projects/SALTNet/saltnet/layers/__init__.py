from .deform_conv import BACKENDS, DeformConv, ModulatedDeformConv, available_backends

__all__ = [k for k in globals().keys() if not k.startswith("_")]
