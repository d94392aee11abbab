"""Sampling parameter validation and its mapping onto transformers' generation."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from playground.errors import ParameterError
from playground.params import SAMPLING_FIELDS, SamplingParams
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
    for field, spec in SAMPLING_FIELDS.items():
        if not spec.numeric:
            continue
        low, high = spec.limits.low, spec.limits.high
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
    names = ["temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size",
             "max_new_tokens", "seed", "stop"]
    values = dict(zip(names, [0.7, 0.9, 40.0, 0.0, 1.0, 1.1, 0.0, 64.0, None, "END\n\\n\\n"]))
    params = params_from_controls(values)
    assert params.top_k == 40 and isinstance(params.top_k, int)
    assert params.max_new_tokens == 64 and params.seed is None
    assert params.stop == ["END", "\n\n"]
    with pytest.raises(ParameterError, match="max_new_tokens"):
        params_from_controls({**values, "max_new_tokens": 0})


# ------------------------------------------------------------------------------------------- the registry


def test_registry_is_derived_from_sampling_params():
    assert list(SAMPLING_FIELDS) == list(SamplingParams.model_fields)
    defaults = SamplingParams()
    for name, field in SAMPLING_FIELDS.items():
        assert field.default == getattr(defaults, name) and field.help and field.limits.reads
    assert SAMPLING_FIELDS["max_new_tokens"].wire_name == "max_tokens" and SAMPLING_FIELDS["top_k"].integer
    assert not SAMPLING_FIELDS["temperature"].integer and not SAMPLING_FIELDS["stop"].numeric


def test_every_consumer_takes_its_fields_from_the_registry():
    from playground.api.http_errors import ApiError
    from playground.api.openai_schemas import ChatCompletionRequest, CompletionRequest
    from playground.api.prompt_endpoint import SeedRequest
    from playground.integrations.langchain import PlaygroundChatModel
    from playground.params import EXTENSION_FIELDS, NUMERIC_FIELDS, OPENAI_FIELDS, VLLM_EXTENSIONS
    from playground.remote import EXTENSIONS_BY_OWNER
    from playground.ui.lab_tab import SETTING_FIELDS

    wire = {SAMPLING_FIELDS[name].wire_name for name in OPENAI_FIELDS}
    assert wire == {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed", "stop"}
    for schema in (ChatCompletionRequest, CompletionRequest):  # /v1 takes every field (a remote refuses by name)
        assert {field.wire_name for field in SAMPLING_FIELDS.values()} <= set(schema.model_fields)
    assert wire <= set(PlaygroundChatModel.model_fields)
    assert set(SAMPLING_FIELDS) <= set(SeedRequest.model_fields)
    assert SETTING_FIELDS == NUMERIC_FIELDS == [name for name in SAMPLING_FIELDS if name != "stop"]
    assert EXTENSIONS_BY_OWNER["vllm"] == VLLM_EXTENSIONS == set(OPENAI_FIELDS) & set(EXTENSION_FIELDS)
    # one range everywhere: the OpenAI schema refuses what SamplingParams refuses, under the wire's name
    with pytest.raises(ApiError, match="max_tokens: must be an integer between 1 and 8192"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=0).sampling_params()
    with pytest.raises(ValueError, match="true/false"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_k=True)
    assert SeedRequest(prompt="x").sampling_params().greedy  # the tutorial's default
    assert PlaygroundChatModel(max_tokens=5, stop="END")._sampling(["\n"]) == {"max_tokens": 5, "stop": ["END", "\n"]}


def test_forms_keep_defaults_for_blanks_and_convert_one_way():
    import numpy as np

    params = SamplingParams.from_form({"top_k": np.int64(5), "temperature": "0.25", "seed": None, "min_p": " "})
    assert (params.top_k, params.temperature, params.seed, params.min_p) == (5, 0.25, None, 0.0)
    with pytest.raises(ParameterError, match=r"top_k: must be an integer .* got 2\.5 \(not a whole number\)"):
        SamplingParams.from_form({"top_k": 2.5})
    with pytest.raises(ParameterError, match=r"temperature: must be between 0 and 5 .* \(not a number\)"):
        SamplingParams.from_form({"temperature": "warm"})
    with pytest.raises(ParameterError, match="temperature: must be between 0 and 5"):
        SamplingParams.from_form({"temperature": math.nan})  # NaN is a value (JSON's), not a blank


def spelled_words(code: str) -> set[str]:
    """The identifiers and words of string literals in `code`, leaving out docstrings and comments."""
    tree = ast.parse(code)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(re.findall(r"\w+", node.value))
        elif isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.keyword, ast.arg)) and node.arg:
            words.add(node.arg)
    return words


def test_no_ui_api_or_integration_module_lists_the_fields():
    """The done-when of the registry: outside params.py a field's name appears in code only where a wire format
    needs it (docstrings and comments may mention fields)."""
    root = Path(__file__).resolve().parents[1] / "playground"
    allowed = {"remote.py": {"top_k"},  # vLLM's "off" for top_k is -1
               "memory.py": {"temperature"}, "memory_tab.py": {"temperature"}}  # the GPU's, in degrees
    for folder in ("ui", "api", "integrations", "."):
        for path in sorted((root / folder).glob("*.py")):
            if path.name == "params.py":
                continue
            words = spelled_words(path.read_text())
            for name in SAMPLING_FIELDS:
                if name not in ("seed", "stop") and name in words and name not in allowed.get(path.name, set()):
                    raise AssertionError(f"{path.relative_to(root)} spells the sampling field {name!r}")


def test_readme_table_lists_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Sampling parameters", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, flags=re.M) == list(SAMPLING_FIELDS)
