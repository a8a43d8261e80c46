"""One exception type for every mistake a user can make.

Entry points in `run/` catch `FgptError` and print its message as a single line, so bad
input never surfaces as a traceback from deep inside torch.
"""


class FgptError(ValueError):
    """A problem with the user's input: config, checkpoint, data or command-line flags."""
