"""Integer helpers and the one spatial-size formula of the block."""


def cdiv(a, b):
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def round_up(a, b):
    """The smallest multiple of b that is >= a."""
    return cdiv(a, b) * b


def next_pow2(n):
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


def conv_output_size(size, stride):
    """H (or W) after the block: its 3x3 conv has padding == dilation, so the
    dilation cancels, and its 1x1 projection the same stride; both give
    floor((size - 1) / stride) + 1."""
    return (size - 1) // stride + 1
