"""The base of the errors models/ raises for input a user can fix (a folder, a file, a build argument).

Scripts print such an error's message as one line instead of a traceback (utils/cli.run_main), as they do for
utils.cli.UserError; it is defined here because models/ depends on nothing of the scripts.
"""

__all__ = ['ModelInputError']


class ModelInputError(Exception):
    """Input a user can fix, found while building, loading or saving a model; the message says what and how."""
