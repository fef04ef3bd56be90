"""``UserError``: a mistake in what the user gave (a config value, a data file, a model path, an output
directory), as opposed to a bug.

It is a ``ValueError``, so code that catches bad input keeps working; ``rlhf-fast`` prints it as one line,
``rlhf-fast: error: ...``, with exit status 2. Any other exception raised inside a trainer, ``ValueError``
included, is taken for a bug and keeps its traceback: an op's own argument check that fires inside a trainer
means the trainer called it wrongly, which a one-line message would hide. So only the code that reads what
the user gave (config checks, ``data``, ``models`` loading, the run directory) raises ``UserError``, and its
message names the option or the file at fault.
"""

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user (an option, a file, a path): the message names it and says what is wrong."""
