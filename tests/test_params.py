"""Sampling parameter validation and its mapping onto transformers' generation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from playground.errors import ParameterError
from playground.params import RANGES, SamplingParams
from playground.ui.controls import params_from_controls

BAD_VALUES = [
    ("temperature", -0.1, "between 0 and 5"),
    ("temperature", 5.5, "between 0 and 5"),
    ("temperature", math.nan, "between 0 and 5"),
    ("temperature", math.inf, "between 0 and 5"),
    ("temperature", "hot", "between 0 and 5"),
    ("top_p", 0, "greater than 0 and at most 1"),
    ("top_p", 1.01, "greater than 0 and at most 1"),
    ("top_k", -1, "between 0 and 10000"),
    ("top_k", 2.5, "between 0 and 10000"),
    ("top_k", True, "not true/false"),
    ("min_p", 1.5, "between 0 and 1"),
    ("typical_p", 0, "greater than 0 and at most 1"),
    ("repetition_penalty", 0, "greater than 0 and at most 10"),
    ("repetition_penalty", 11, "greater than 0 and at most 10"),
    ("no_repeat_ngram_size", -2, "between 0 and 64"),
    ("max_new_tokens", 0, "between 1 and 8192"),
    ("max_new_tokens", 10_000, "between 1 and 8192"),
    ("seed", -5, "between 0 and 4294967295"),
    ("seed", 2**32, "between 0 and 4294967295"),
    ("stop", [""], "must not be empty"),
    ("stop", ["x"] * 17, "at most 16"),
    ("stop", ["x" * 201], "at most 200"),
]


@pytest.mark.parametrize("field,value,words", BAD_VALUES)
def test_out_of_range_names_field_and_range(field, value, words):
    with pytest.raises(ParameterError) as caught:
        SamplingParams.parse({field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}:") and words in str(caught.value)


def test_unknown_field_is_named():
    with pytest.raises(ParameterError, match="temprature: is not a sampling parameter"):
        SamplingParams.parse({"temprature": 1})


def test_every_range_boundary_is_accepted():
    for field, (low, high, _) in RANGES.items():
        if field in ("top_p", "typical_p", "repetition_penalty"):
            low = 0.01
        assert getattr(SamplingParams.parse({field: low}), field) == low
        assert getattr(SamplingParams.parse({field: high}), field) == high


def test_greedy_sets_no_sampling_knobs():
    kwargs = SamplingParams.parse({"temperature": 0, "repetition_penalty": 1.2}).generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["repetition_penalty"] == 1.2
    assert all(kwargs[k] is None for k in ("temperature", "top_p", "top_k", "min_p", "typical_p"))
    assert SamplingParams.parse({"temperature": 0}).logits_warpers() == []


def test_sampling_uses_transformers_warpers_in_order():
    params = SamplingParams.parse({"temperature": 0.5, "top_k": 10, "top_p": 0.8, "min_p": 0.05, "stop": "END"})
    kinds = [type(w) for w in params.logits_warpers()]
    assert kinds == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper]
    kwargs = params.generate_kwargs()
    assert kwargs["do_sample"] is True and kwargs["stop_strings"] == ["END"]
    scores = torch.randn(1, 100)
    warped = params.logits_warpers()(torch.zeros(1, 1, dtype=torch.long), scores.clone())
    assert int(torch.isfinite(warped).sum()) <= 10  # top_k cut everything past the tenth token


def test_controls_convert_ui_values():
    values = [0.7, 0.9, 40.0, 0.0, 1.0, 1.1, 0.0, 64.0, None, "END\n\\n\\n"]
    params = params_from_controls(values)
    assert params.top_k == 40 and isinstance(params.top_k, int)
    assert params.max_new_tokens == 64 and params.seed is None
    assert params.stop == ["END", "\n\n"]
    with pytest.raises(ParameterError, match="max_new_tokens"):
        params_from_controls([0.7, 0.9, 40, 0, 1, 1, 0, 0, None, ""])
