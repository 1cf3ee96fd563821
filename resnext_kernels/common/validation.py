"""Argument checks shared by the layers above (errors name the argument)."""


def check_positive_int(name, value):
    """Raise TypeError unless value is an int (bools are not), ValueError unless >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
