"""The exception type the command line turns into a short message and a non-zero exit."""


class LmmtuneError(Exception):
    """A problem the user can fix (bad data, missing model, bad setting); no traceback shown."""

    exit_code = 1


class RunInterrupted(LmmtuneError):
    """SIGINT/SIGTERM stopped training after a checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalStop(KeyboardInterrupt):
    """SIGINT/SIGTERM outside the training loop: a KeyboardInterrupt, so that no `except
    Exception` on the way swallows it; the command line prints its message, no traceback."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.message = message
        self.exit_code = 128 + signum
