"""Argument checks shared by the layers above (errors name the argument)."""


def check_positive_int(name, value):
    """Raise TypeError unless value is an int (bools are not), ValueError unless >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_like_x(x, named, dtype_rule):
    """Raise TypeError / ValueError naming the first tensor of `named` (name
    -> tensor or None) whose dtype / device differs from x's; dtype_rule
    ends the dtype message (what the caller requires)."""
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; {dtype_rule}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
