"""The one exception type users see.

Every failure caused by bad input (unknown model, bad recipe, corrupt file, …) raises
`SparseLLMError` with a one-line, actionable message; the CLI prints it and exits 2.
Anything else escaping is a bug and keeps its traceback.
"""


class SparseLLMError(Exception):
    """Bad input or an unusable environment, explained in one line."""
