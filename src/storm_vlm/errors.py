"""Errors a user can cause. The CLI turns these into one clear message and exit code 2."""


class StormError(ValueError):
    """Base for user-facing errors (bad file, bad config, bad flag): the message names the cause."""


class ConfigError(StormError):
    """A configuration file or value is invalid."""
