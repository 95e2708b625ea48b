"""The domain's error types; the service maps each to one HTTP status in one place.

Every message says what went wrong and what to do about it.
"""


class LockstepError(Exception):
    """Base of every error Lockstep raises on purpose."""


class InvalidInput(LockstepError, ValueError):
    """The caller's input cannot be used as given (HTTP 422)."""


class EmptyInput(InvalidInput):
    """The caller sent nothing to work on (HTTP 400)."""


class NotFound(LockstepError, KeyError):
    """A named document, release or model does not exist (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Conflict(LockstepError):
    """The request contradicts current state, e.g. deleting the active release (HTTP 409)."""


class NotReady(LockstepError):
    """Nothing can answer yet, e.g. no active release (HTTP 503)."""


class Busy(NotReady):
    """Another process held a store's write lock for the whole wait; retrying later succeeds (HTTP 503)."""


class IntegrityError(LockstepError):
    """Stored data does not match what was recorded for it; refusing to use it (HTTP 500-class, 424)."""
