"""genmon: Kafka-native monitoring and feedback for generative-AI models in production."""

from genmon.exceptions import GenmonError
from genmon.settings import Settings, get_settings

__version__ = "0.1.0"
__all__ = ["GenmonError", "Settings", "__version__", "get_settings"]
