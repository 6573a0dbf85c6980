"""The data pipeline's errors, apart from its types so that reading files needs no torch (the
launcher checks the data before it writes a run dir)."""


class DataError(ValueError):
    """Unusable training data; the message names the file and, where there is one, the 1-based row."""


class RowError(ValueError):
    """Raised by a format for one bad row; the reader adds the file and row and applies `on_error`."""
