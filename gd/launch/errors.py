"""The launcher's one error type: a message for the person at the terminal, raised before anything is submitted."""


class LaunchError(Exception):
    """A run cannot be launched as configured; the message says which value is wrong and what was expected."""
