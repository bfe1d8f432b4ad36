from .deform_conv import *  # noqa: F401,F403
from .deform_conv import __all__  # noqa: F401
