"""The solver's input error, in a module of its own so that every model module can raise it."""


class ModelError(ValueError):
    """A model or profile input is invalid; the message names the bad field and value."""
