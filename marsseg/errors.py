"""The exception types a command ends with: bad user input, and a run stopped from outside.

Library code raises ``InputError`` with a single line that names the file, key,
shape or value at fault; the CLI prints that line and exits with code 2. ``RunError``
is one line too (exit 1) for what is not the input's fault, such as a worker Ray
killed for memory.
"""


class InputError(Exception):
    """Bad input from the user (file, key, shape, value). One-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class RunError(Exception):
    """A run stopped for a reason outside the user's input (a worker killed for memory,
    a node lost). One-line message saying what happened and what to do; the CLI prints
    it and exits with code 1."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
