"""What a row is checked against, apart from the dataset types so that reading and checking rows
needs no torch (``ftl train`` checks every row before it writes a run dir): the errors that name
the file and row, and the label of a token that is not trained."""

IGNORE_INDEX = -100  # the label torch's cross-entropy (and HF models) skip


class DataError(ValueError):
    """Unusable training data; the message names the file and, where there is one, the 1-based row."""


class RowError(ValueError):
    """Raised by a format for one bad row; the reader adds the file and row and applies `on_error`."""
