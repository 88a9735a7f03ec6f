"""CTranslate2 refusing a batch's options (should the API's checks ever let one through) is
the requests' own error: a client error naming the field, never a 500 or 424."""

from __future__ import annotations

import pytest

from app.backends.ctranslate2.backend import _refused
from app.domain import InvalidRequestError


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("sampling_topk option (49153) is greater than the vocabulary size (49152)", "top_k"),
        ("The repetition penalty must be > 0", "repetition_penalty"),
        ("The sampling_topp parameter must be between 0 and 1", "top_p"),
        ("something else entirely", None),
    ],
)
def test_a_refusal_names_the_field(message: str, param: str | None) -> None:
    error = _refused(ValueError(message))
    assert isinstance(error, InvalidRequestError)
    assert error.param == param
    assert message in error.message
