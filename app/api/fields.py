"""Numeric request fields in the terms of the engines behind them. CTranslate2 and vLLM take
sampling parameters as float32 and token counts as 32-bit integers: a value that is fine as a
Python number but not in theirs (1e-46 is 0 in float32; 2**64 fits no C integer) is refused
here, naming its field, rather than reaching an engine that would fail on it."""

from __future__ import annotations

import math
import struct
from typing import Annotated

from pydantic import AfterValidator, Field

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1


def as_float32(value: float) -> float:
    """`value` rounded to float32, as an engine sees it."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def _not_zero_in_float32(value: float) -> float:
    if value != 0 and as_float32(value) == 0:
        raise ValueError(f"{value} is 0 in float32, the precision the engine computes in")
    return value


# A float the engine needs above 0 (top_p, repetition penalty, TGI's temperature).
PositiveFloat32 = Annotated[
    float, Field(gt=0, allow_inf_nan=False), AfterValidator(_not_zero_in_float32)
]
# A number of tokens.
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
