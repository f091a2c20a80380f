"""The errors fedlora shows as one line with exit code 2: mistakes in what the user gave it (config, command
line, files, data, a federation that cannot go on). Anything else that escapes is a bug: the CLI prints its
traceback and exits 1. Library ValueErrors (numpy, torch, transformers) are not user errors."""


class UserError(ValueError):
    """A mistake in the user's config, command line, files or data: one line, exit code 2."""


class ConfigError(UserError):
    """A user error in the config or the command line."""


class RoundFailed(UserError):
    """A round that cannot be aggregated (fewer than federation.min_clients valid updates)."""


def one_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a message, cut to `limit` characters (for one-line reasons and errors)."""
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
