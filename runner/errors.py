"""One error type for bad configuration, raised before any training starts."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is invalid. The message names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: Any) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"Invalid config: {key}={value!r}; allowed: {allowed}")


def check(condition: bool, key: str, value: Any, allowed: Any) -> None:
    if not condition:
        raise ConfigError(key, value, allowed)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite: training stops and the job's run ends FAILED."""
