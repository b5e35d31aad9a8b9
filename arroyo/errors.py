"""Exception types. Every error Arroyo raises on purpose derives from ``ArroyoError``."""

from __future__ import annotations


class ArroyoError(Exception):
    """Base of Arroyo's own errors."""


class WireError(ArroyoError):
    """Frames that are not a valid Arroyo message (malformed, oversized, unknown version).

    Decoding untrusted input raises this and nothing else; the stage counts the
    message under ``reason`` and drops it.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(ArroyoError):
    """A user's mistake in a topology file or an option: reported without a traceback."""


class TopologyError(ConfigError):
    """One or more problems in a topology file; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
