"""lsm: linear sequence models with Mixture-of-Memories."""
from lsm import rules

__version__ = "0.1.0"
__all__ = ["rules", "__version__"]
