"""tokenbench: measure token-reduction methods (accuracy, latency, memory) on equal terms."""

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_method, register_model, register_task

__version__ = "0.1.0"
__all__ = ["register_method", "register_model", "register_task", "TokenbenchError", "__version__"]
