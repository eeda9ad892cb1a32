"""genmon: Kafka-native monitoring and feedback for generative-AI models in production.

``import genmon`` loads nothing but this file: the SDK (:class:`~genmon.sdk.Monitor`, with
its Kafka client) and the settings (pydantic) load on first use, so a service pays for
them only when it logs, and ``genmon --help`` stays instant.
"""

from typing import TYPE_CHECKING, Any

from genmon.exceptions import GenmonError

if TYPE_CHECKING:
    from genmon.sdk import Monitor
    from genmon.settings import Settings, get_settings

__version__ = "0.1.0"
__all__ = ["GenmonError", "Monitor", "Settings", "__version__", "get_settings"]


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from genmon.sdk import Monitor

        return Monitor
    if name in {"Settings", "get_settings"}:
        import genmon.settings

        return getattr(genmon.settings, name)
    raise AttributeError(f"module 'genmon' has no attribute {name!r}")
