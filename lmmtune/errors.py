"""The one exception type the command line turns into a short message and a non-zero exit."""


class LmmtuneError(Exception):
    """A problem the user can fix (bad data, missing model, bad setting); no traceback shown."""
