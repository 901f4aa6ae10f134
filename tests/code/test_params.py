"""The scoring parameters have one parser (coinyear.params): the gateway's request parser and the packaged model
accept and refuse the same `interval`, `neighbours` and `portraits`, with the same words, and refuse what a model
version was not logged with for the same reasons."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from coinyear.params import ScoringParams, parse_params, unsupported
from coinyear.pyfunc import BACK, FRONT, CoinYearModel, InvalidCoinInput
from coinyear.serve.wire import InvalidRequest, parse_body

BAD = [
    ({"interval": 1}, "interval must be a coverage level between 0 and 1 (e.g. 0.9)"),
    ({"interval": 1.5}, "interval must be a coverage level between 0 and 1 (e.g. 0.9)"),
    ({"interval": -0.1}, "interval must be a coverage level between 0 and 1 (e.g. 0.9)"),
    ({"interval": "0.9"}, "interval must be a coverage level between 0 and 1 (e.g. 0.9)"),
    ({"interval": True}, "interval must be a coverage level between 0 and 1 (e.g. 0.9)"),
    ({"neighbours": 21}, "neighbours must be a whole number from 0 (none) to 20, got 21"),
    ({"neighbours": 2.0}, "neighbours must be a whole number from 0 (none) to 20, got 2.0"),
    ({"portraits": 6}, "portraits must be a whole number from 0 (none) to 5, got 6"),
    ({"portraits": True}, "portraits must be a whole number from 0 (none) to 5, got True"),
    ({"interval": 2, "neighbours": 99}, "interval must be a coverage level between 0 and 1 (e.g. 0.9)"),  # in order
]


def bare_model(quality=None, references=None, portraits=()) -> CoinYearModel:
    """A packaged model as load_context leaves it, without the network: enough to check parameters."""
    model = CoinYearModel()
    model.quality, model.references, model.portraits = quality, references, list(portraits)
    return model


def gateway_message(params: dict) -> str:
    body = json.dumps({"dataframe_records": [{FRONT: "x", BACK: "y"}], "params": params}).encode()
    with pytest.raises(InvalidRequest) as refused:
        parse_body(body, max_rows=4)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    return refused.value.message


def model_message(model: CoinYearModel, params: dict) -> str:
    with pytest.raises(InvalidCoinInput) as refused:
        model.predict(None, pd.DataFrame({FRONT: [], BACK: []}), params)
    return refused.value.message


def test_what_is_accepted():
    assert parse_params({}) == ScoringParams()
    assert parse_params({"interval": None, "neighbours": None, "portraits": None}) == ScoringParams()
    assert parse_params({"interval": 0, "neighbours": 0, "portraits": 0}) == ScoringParams()
    assert parse_params({"interval": 0.9, "neighbours": 20, "portraits": 5}) == ScoringParams(0.9, 20, 5)
    assert parse_params({"interval": np.float32(0.5), "neighbours": np.int64(3)}) == ScoringParams(0.5, 3, 0)
    asked = parse_params({"interval": 0.9, "neighbours": 1, "batch_size": 8})  # other params are not its business
    assert (type(asked.interval), type(asked.neighbours)) == (float, int)


@pytest.mark.parametrize(("params", "message"), BAD)
def test_the_gateway_and_the_packaged_model_refuse_alike(params, message):
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        parse_params(params)
    assert gateway_message(params) == f"params.{message}"
    assert model_message(bare_model(), params) == message


def test_what_a_version_was_not_logged_with_is_refused_for_the_same_reasons():
    full = {"intervals": True, "references": True, "portraits": True}
    assert unsupported(ScoringParams(0.9, 5, 3), **full) is None
    for asked, lacking, reason in [
        (ScoringParams(interval=0.9), "intervals",
         "was logged without interval calibration; call it without `interval`"),
        (ScoringParams(neighbours=2), "references",
         "was logged without its reference coins; call it without `neighbours`"),
        (ScoringParams(portraits=1), "portraits",
         "was trained without a named portrait head; call it without `portraits`"),
    ]:
        assert unsupported(asked, **{**full, lacking: False}) == reason
        params = {"interval": asked.interval, "neighbours": asked.neighbours, "portraits": asked.portraits}
        assert model_message(bare_model(), params) == f"this model version {reason}"
    # the first the version lacks, in the order interval, neighbours, portraits
    assert unsupported(ScoringParams(0.9, 2, 1), intervals=True, references=False, portraits=False) == (
        "was logged without its reference coins; call it without `neighbours`")
