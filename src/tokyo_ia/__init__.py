"""Tokyo-IA: a self-hosted, OpenAI-compatible AI gateway."""

from .config import Config, default_config, load_config, parse_config
from .errors import ConfigError, GatewayError, TokyoIAError
from .gateway import Gateway

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Gateway",
    "GatewayError",
    "TokyoIAError",
    "__version__",
    "default_config",
    "load_config",
    "parse_config",
]
