"""Errors users see. Torch-free, so command-line tools that only report them start fast."""


class ConfigError(ValueError):
    """A user mistake in flags or files. Reported once from rank 0, without a traceback, with a non-zero exit."""
