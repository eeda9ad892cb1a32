"""genmon: Kafka-native monitoring and feedback for generative-AI models in production."""

from typing import TYPE_CHECKING, Any

from genmon.exceptions import GenmonError
from genmon.settings import Settings, get_settings

if TYPE_CHECKING:
    from genmon.sdk import Monitor

__version__ = "0.1.0"
__all__ = ["GenmonError", "Monitor", "Settings", "__version__", "get_settings"]


def __getattr__(name: str) -> Any:
    # The SDK pulls in kafka-python; import it on first use so `genmon --help` stays fast.
    if name == "Monitor":
        from genmon.sdk import Monitor

        return Monitor
    raise AttributeError(f"module 'genmon' has no attribute {name!r}")
