"""`POST /`: the Yuan2.0-M32 FastAPI tutorial's endpoint, kept for clients written against it.

Request `{"prompt": str, "history": [...], <sampling fields>}`; answer
`{"response": str, "history": [...], "status": 200, "time": "YYYY-mm-dd HH:MM:SS"}`. Like the tutorial it
decodes greedily with at most 256 new tokens unless told otherwise. `history` may be chat messages
(`[{"role", "content"}]`), the tutorial's strings alternating user and assistant, or [user, assistant]
pairs; the answer's history extends it in the same style, so a client can send it straight back.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from playground.api.http_errors import ApiRoute, generation_failed
from playground.api.dependencies import current_manager
from playground.api.events import collect, generation_events, unless_disconnected
from playground.manager import ModelManager
from playground.params import GREEDY, SAMPLING_FIELDS, SamplingParams, request_fields

router = APIRouter(route_class=ApiRoute, tags=["tutorial endpoint"])


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


History = list[Turn] | list[str] | list[tuple[str, str]]


# Every sampling field under the playground's own names; like the tutorial, greedy unless told otherwise.
TutorialSampling = create_model("TutorialSampling", **request_fields(
    SAMPLING_FIELDS, defaults=GREEDY, described={name: "the default is greedy, as in the tutorial" for name in GREEDY}))


class SeedRequest(TutorialSampling):
    # Strict on names: a misspelt sampling field should be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    history: History = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is only whitespace")
        return value

    @field_validator("history")
    @classmethod
    def _whole_exchanges(cls, value: History) -> History:
        if value and isinstance(value[0], str) and len(value) % 2:
            raise ValueError(
                f"a history of strings alternates user and assistant turns, so it needs an even number of "
                f"entries, got {len(value)}"
            )
        return value

    def sampling_params(self) -> SamplingParams:
        return SamplingParams.parse({**GREEDY, **self.model_dump(include=set(SAMPLING_FIELDS), exclude_none=True)})

    def messages(self) -> list[dict[str, str]]:
        return [*history_messages(self.history), {"role": "user", "content": self.prompt}]


def history_messages(history: History) -> list[dict[str, str]]:
    """Any accepted history style as chat messages."""
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(history):
        if isinstance(turn, Turn):
            messages.append({"role": turn.role, "content": turn.content})
        elif isinstance(turn, str):
            messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": turn})
        else:
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages


def extended_history(history: History, prompt: str, response: str) -> list[Any]:
    """The history with this exchange appended, in the style the client used (messages when empty)."""
    if history and isinstance(history[0], str):
        return [*history, prompt, response]
    if history and isinstance(history[0], tuple):
        return [*(list(pair) for pair in history), [prompt, response]]
    previous = [turn.model_dump() for turn in history]
    return [*previous, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@router.post("/")
async def seed_chat(body: SeedRequest, request: Request,
                    manager: ModelManager = Depends(current_manager)) -> dict[str, Any]:
    """One reply to `prompt` after `history`, formatted with the model's chat format."""
    params = body.sampling_params()
    events = generation_events(manager, messages=body.messages(), params=params)
    done, _ = await unless_disconnected(request, collect(events))
    if done.stats.finish_reason == "error":
        raise generation_failed(done.stats)
    return {
        "response": done.text,
        "history": extended_history(body.history, body.prompt, done.text),
        "status": 200,
        "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }
