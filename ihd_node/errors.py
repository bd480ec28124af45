"""The one exception type for errors a user can cause; the CLI prints its message, never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad config, bad file, unreachable PACS). The message says cause and fix."""
