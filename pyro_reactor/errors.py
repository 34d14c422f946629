"""The one exception type whose message is the ``error`` answered to the host."""


class ActionError(Exception):
    """A request could not be served; ``str(error)`` is sent as ``{"error": ...}``.

    Handlers raise it (or fail their ``Deferred`` with it) for every expected failure: bad
    input, a missing path, a shell that is not running. Its message is shown to the host as
    it is, so it must never contain a secret or a file's content.
    """

    @property
    def message(self) -> str:
        return str(self)
