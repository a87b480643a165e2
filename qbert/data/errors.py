"""Errors raised on bad input data: the message always names the file, line or field."""


class DataError(ValueError):
    """Input data is malformed or inconsistent."""
