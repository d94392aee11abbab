"""LangChain's own conformance suite (`langchain-tests`) for PlaygroundChatModel, in-process against the embedded model.

The capability flags say what the model does: structured output and JSON mode yes (constrained decoding), tool
calling, images, audio, video and PDFs no. Every test the flags leave on must pass; the suite skips the others.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from playground.integrations.langchain import PlaygroundChatModel

pytestmark = pytest.mark.slow  # about 60 replies

# A 135M model decoding greedily falls into loops ("sampu, sampu, ...") that never close a JSON string; a light
# repetition penalty (an extension the model takes) keeps its replies finite. At 1.1 the joke's "setup" string still
# ran past 256 tokens on the int4 kernels; from 1.2 on, the JSON-mode test's keys, named in its prompt, are penalised.
OWN_PARAMS = {"repetition_penalty": 1.15}
# Greedy and short: what the unit suite's standard parameters already say (and its test of them adds max_tokens).
STANDARD_PARAMS = {"temperature": 0, "max_tokens": 100}
# Most checks only need a reply to exist, so it stays short (the suite's "Hello" gets about 50 tokens otherwise); a
# structured reply keeps the suite's 100 tokens, room for its whole JSON object.
SHORT_REPLY_TOKENS = 12
WHOLE_REPLY_TESTS = ("structured_output", "json_mode")


# The suites build the model from `chat_model_params`, a property without fixtures: the session's manager is put
# here by the autouse fixture below before any test of this module runs.
MANAGER: dict = {}


@pytest.fixture(scope="module", autouse=True)
def embedded_model(embedded_manager):
    """The session's manager with the embedded model."""
    MANAGER["manager"] = embedded_manager


class Capabilities:
    """The flags both suites read, stated rather than inferred."""

    @property
    def chat_model_class(self) -> type[PlaygroundChatModel]:
        return PlaygroundChatModel

    @property
    def chat_model_params(self) -> dict:
        return dict(OWN_PARAMS, manager=MANAGER["manager"])

    @property
    def supports_model_override(self) -> bool:
        return False  # a playground serves the one model it has loaded; naming another is an error

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestPlaygroundChatModelUnit(Capabilities, ChatModelUnitTests):
    pass


class TestPlaygroundChatModelIntegration(Capabilities, ChatModelIntegrationTests):
    max_tokens = STANDARD_PARAMS["max_tokens"]

    @pytest.fixture(autouse=True)
    def reply_length(self, request):
        """Before the suite's `model` fixture builds the model from `chat_model_params`: this test's reply limit."""
        if not any(name in request.node.name for name in WHOLE_REPLY_TESTS):
            self.max_tokens = SHORT_REPLY_TOKENS

    @property
    def chat_model_params(self) -> dict:
        return {**STANDARD_PARAMS, **super().chat_model_params, "max_tokens": self.max_tokens}
