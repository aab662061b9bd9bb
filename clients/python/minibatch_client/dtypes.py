"""Wire dtypes: the proto's `Dtype` enum, what numpy holds each in, and how
x decodes to float32.

The table is built from the generated enum (`_proto/minibatch_pb2.Dtype`),
so a value added to the proto is known here after `generate.py`, and one
that numpy cannot hold fails at import (the tests import this) instead of
being silently unreadable.
"""
from __future__ import annotations

from typing import Union

import numpy as np

from ._proto import minibatch_pb2 as pb

_PREFIX = "DTYPE_"

# Where the enum's name is not a numpy dtype name: bfloat16 has no numpy
# dtype, so its raw bits come back as uint16 (decode=True widens to float32).
_NUMPY_NAME = {"bfloat16": "uint16"}


def _table() -> dict[int, tuple[str, np.dtype]]:
    out = {}
    for enum_name, code in pb.Dtype.items():
        if code:  # DTYPE_UNSPECIFIED ("as stored" in requests) is not a wire dtype
            name = enum_name[len(_PREFIX):].lower()
            out[code] = (name, np.dtype(_NUMPY_NAME.get(name, name)).newbyteorder("<"))
    return out


#: proto Dtype value -> (name, numpy dtype of the little-endian wire bytes)
DTYPES: dict[int, tuple[str, np.dtype]] = _table()
#: name -> proto Dtype value
DTYPE_NAMES = {name: code for code, (name, _) in DTYPES.items()}


def dtype_code(d: Union[None, str, int, np.dtype, type]) -> int:
    """The proto Dtype value for a user's dtype: None (as stored), a name
    ("uint8", "bfloat16", "DTYPE_UINT8"), a numpy dtype or type, or the enum int."""
    if d is None:
        return 0
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        if int(d) == 0 or int(d) in DTYPES:
            return int(d)
        raise ValueError(f"unknown Dtype value {d}")
    if isinstance(d, str):
        name = d.lower()
        name = name[len(_PREFIX):] if name.startswith(_PREFIX.lower()) else name
        if name in ("", "unspecified", "stored"):
            return 0
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPE_NAMES)}")
    try:
        name = np.dtype(d).name
    except TypeError:
        raise ValueError(f"unknown dtype {d!r}") from None
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name} has no wire form; known: {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def dtype_name(code: int) -> str:
    """The name of a proto Dtype value; "unspecified" for 0 or one unknown here."""
    return DTYPES[code][0] if code in DTYPES else "unspecified"


def decode_x(t) -> np.ndarray:
    """x (a wire.Tensor) as float32 values, exactly: uint8 with a scale
    divisor becomes float32(byte) / divisor (as the server defines it),
    float16 and bfloat16 widen exactly; float32 is returned as is; anything
    else unchanged."""
    a = t.array
    if t.dtype == "uint8" and t.scale_divisor:
        out = a.astype(np.float32)
        out /= np.float32(t.scale_divisor)
        return out
    if t.dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if t.dtype == "float16":
        return a.astype(np.float32)
    return a
