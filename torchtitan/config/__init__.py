"""Job configuration: typed sections, TOML + CLI loading, validation."""
from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import ConfigError, load_config, to_toml

__all__ = ["ConfigError", "JobConfig", "load_config", "to_toml"]
