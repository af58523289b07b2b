"""The one exception type for bad user input.

Library code raises ``InputError`` with a single line that names the file, key,
shape or value at fault; the CLI prints that line and exits with code 2.
"""


class InputError(Exception):
    """Bad input from the user (file, key, shape, value). One-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
