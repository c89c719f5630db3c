"""The one error type raised for unusable dataset files and folders."""


class DatasetError(ValueError):
  """A dataset folder or file cannot be used; the message names the path.

  A subclass of ValueError so callers that already handle bad input keep
  working, while `main.py` can report it without a traceback.
  """
