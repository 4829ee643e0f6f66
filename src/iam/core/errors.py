"""The error a setting raises where it cannot be served: ``ConfigError``, a ``ValueError`` that names its parameter in
a field, so that each front end names the parameter its own way (the command line by its flag)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A parameter's value that cannot be served.

    Parameters
    ----------
    param : the parameter's name in the library (a ``MappingConfig`` or eviction policy field, ...).
    message : the message, naming the parameter as ``{param}`` (filled with ``param`` in ``str(error)``).
    """

    def __init__(self, param: str, message: str) -> None:
        self.param, self.message = param, message
        super().__init__(self.naming(param))

    def naming(self, name: str) -> str:
        """The message with the parameter called ``name`` (e.g. the command line's ``--flag``)."""
        return self.message.replace("{param}", name)
