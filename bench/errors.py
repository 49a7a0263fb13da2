"""User-facing errors: one clear line, raised before anything expensive happens."""


class TokenbenchError(Exception):
    """An error caused by the user's input (names, budgets, data paths); the CLI prints it as one line."""


class IncompatibleError(TokenbenchError):
    """A method, model and task that cannot be combined."""
