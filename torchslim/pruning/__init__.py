"""Layer pruning functions: physically slicing parameters and keeping attributes consistent."""

from torchslim.pruning.functions import *  # noqa: F403
from torchslim.pruning.functions import __all__  # noqa: F401
