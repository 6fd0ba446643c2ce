"""oltr: open long-tailed recognition (Liu et al., CVPR 2019)."""
from oltr.errors import InputError, OltrError

__all__ = ["InputError", "OltrError", "__version__"]
__version__ = "0.1.0"
