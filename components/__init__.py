"""resops components: importable, unit-tested building blocks for every pipeline stage."""


class ResopsError(Exception):
    """A failure with a message meant for the user: the CLI prints it as one line and exits 1."""
