"""The data behind the insight views: token inspector, next-token explorer and expert routing.

Everything here is plain data in, plain data (pandas frames, escaped HTML, small dicts) out, so the views can be
tested without a browser. The one function that touches a whole vocabulary (`explore_distribution`) is meant to
run through the manager's `compute(...)`: see ModelManager.compute for why.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict
from typing import Any

import pandas as pd
import torch
from pandas.io.formats.style import Styler

from playground.params import DISTRIBUTION_FIELDS, SamplingParams

INSPECT_TOP = 5  # alternatives recorded per token for the inspector (TokenInfo.top / sampled_top)
MAX_EXPLORER_TOP = 50


# ---------------------------------------------------------------------------------------- shared helpers


def visible_token(text: str) -> str:
    """A token's text with whitespace made visible, so a space or newline token can be told apart."""
    if text == "":
        return "∅"
    return text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣")


def probability_colour(probability: float | None) -> str:
    """Red (unlikely) through yellow to green (likely); grey when unknown."""
    if probability is None or math.isnan(probability):
        return "hsl(0, 0%, 88%)"
    return f"hsl({120 * max(0.0, min(1.0, probability)):.0f}, 75%, 80%)"


def _probability(logprob: float | None) -> float | None:
    return None if logprob is None else math.exp(logprob)


def for_people(value: Any) -> str:
    """A number rounded to 3 significant digits, without an exponent unless it is tiny (0.364, 11.2, 1230);
    whole numbers stay as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isinf(value):
        return str(value)
    if float(value).is_integer():  # counts, ids and seeds stay exact
        return str(int(value))
    if abs(value) < 1e-4:
        return f"{value:.2e}"
    magnitude = math.floor(math.log10(abs(value)))
    text = f"{round(value, 2 - magnitude):.{max(0, 2 - magnitude)}f}"  # 1234.5 -> 1230, 0.36364 -> 0.364
    return text.rstrip("0").rstrip(".") if "." in text else text


def readable(frame: pd.DataFrame | None) -> Styler | None:
    """A table as people read it: decimals shown to 3 significant digits. The data underneath keep their full
    precision (API clients and the CSV get those); only what the browser displays is rounded."""
    if frame is None:
        return None
    decimals = [column for column in frame.columns if pd.api.types.is_float_dtype(frame[column])]
    return frame.style.format(for_people, subset=decimals)


def mean_logprob(tokens: list[dict[str, Any]]) -> float | None:
    """The mean log-probability per token under the model's own distribution (None when none was recorded)."""
    values = [t["logprob"] for t in tokens if t.get("logprob") is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------- token inspector


def tokens_to_state(tokens: list[Any]) -> list[dict[str, Any]]:
    """TokenInfo objects -> plain dicts, the form kept per reply / cell in the UI's session state."""
    return [asdict(t) if not isinstance(t, dict) else t for t in tokens]


def tokens_html(tokens: list[dict[str, Any]]) -> str:
    """The reply token by token, each coloured by the probability it was sampled with (escaped HTML)."""
    if not tokens:
        return "<p>No tokens were recorded for this reply.</p>"
    spans = []
    for index, token in enumerate(tokens, start=1):
        sampled = _probability(token.get("sampled_logprob"))
        raw = _probability(token.get("logprob"))
        title = (
            f"#{index} · id {token['id']} · sampled p "
            f"{'n/a' if sampled is None else f'{sampled:.3f}'} · model p {'n/a' if raw is None else f'{raw:.3f}'}"
        )
        text = token.get("text", "")
        shown = html.escape(text.replace("\n", "↵\n") if text else "∅")
        spans.append(
            f'<span class="insight-token" title="{html.escape(title, quote=True)}" '
            f'style="background:{probability_colour(sampled)};border-radius:3px;padding:0 1px;margin:0 1px;'
            f'white-space:pre-wrap"><sub style="opacity:.55">{index}</sub>{shown}</span>'
        )
    legend = (
        '<div style="font-size:.85em;margin-top:.5em">Colour: probability the token was sampled with, '
        f'<span style="background:{probability_colour(0.0)}">&nbsp;0&nbsp;</span> → '
        f'<span style="background:{probability_colour(0.5)}">&nbsp;0.5&nbsp;</span> → '
        f'<span style="background:{probability_colour(1.0)}">&nbsp;1&nbsp;</span>. '
        "Hover a token for its figures; the small number is its index.</div>"
    )
    return f'<div class="insight-tokens" style="line-height:2">{"".join(spans)}</div>{legend}'


def tokens_frame(tokens: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per token: its text and the probability of it under the raw and the sampling distribution."""
    rows = [
        {
            "index": i,
            "token": visible_token(t.get("text", "")),
            "id": t["id"],
            "sampled p": _probability(t.get("sampled_logprob")),
            "model p": _probability(t.get("logprob")),
        }
        for i, t in enumerate(tokens, start=1)
    ]
    return pd.DataFrame(rows, columns=["index", "token", "id", "sampled p", "model p"])


def _is_chosen(token: dict[str, Any], alternative_id: int, alternative_text: str) -> bool:
    # A remote engine reports token texts without ids (id -1): compare the texts then.
    if token["id"] < 0 or alternative_id < 0:
        return alternative_text == token.get("text")
    return alternative_id == token["id"]


def alternatives_frame(token: dict[str, Any]) -> pd.DataFrame:
    """The token's top alternatives side by side: the model's raw distribution and the one after the settings.

    Under greedy decoding the chosen token is the only one the sampling distribution holds (p 1).
    """
    raw = token.get("top") or []
    sampled = token.get("sampled_top") or []
    rows = []
    for rank in range(max(len(raw), len(sampled))):
        row: dict[str, Any] = {"rank": rank + 1}
        if rank < len(raw):
            token_id, text, logprob = raw[rank]
            row.update({"model token": visible_token(text), "model p": math.exp(logprob),
                        "model chosen": _is_chosen(token, token_id, text)})
        if rank < len(sampled):
            token_id, text, logprob = sampled[rank]
            row.update({"sampled token": visible_token(text), "sampled p": math.exp(logprob),
                        "sampled chosen": _is_chosen(token, token_id, text)})
        rows.append(row)
    columns = ["rank", "model token", "model p", "model chosen", "sampled token", "sampled p", "sampled chosen"]
    # The sampling distribution may hold fewer tokens (greedy: one; a structure forbids some): blank, not NaN.
    return pd.DataFrame(rows, columns=columns).fillna(
        {"model token": "", "model chosen": False, "sampled token": "", "sampled chosen": False})


# ---------------------------------------------------------------------------------- next-token explorer


def distributions(logits: torch.Tensor, prompt_ids: list[int], params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(model probabilities, probabilities after the settings), each [vocab], with transformers' own processors."""
    scores = logits.detach().float().reshape(1, -1)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long).reshape(1, -1)
    return scores.softmax(-1)[0], params.next_token_scores(input_ids, scores).softmax(-1)[0]


def explore_distribution(logits: torch.Tensor, prompt_ids: list[int], params: SamplingParams, tokenizer,
                         top_n: int = 20) -> pd.DataFrame:
    """The top-N next tokens by the model's probability, with the probability after the settings and a cut flag.

    `bar` is what the chart draws: the probability after the settings for kept tokens, the model's probability
    (drawn in the "cut" colour) for tokens the settings remove.
    """
    top_n = max(1, min(int(top_n), MAX_EXPLORER_TOP, logits.numel()))
    model_probs, sampled_probs = distributions(logits, prompt_ids, params)
    values, ids = model_probs.topk(top_n)
    rows = []
    for rank, (token_id, model_p) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
        sampled_p = float(sampled_probs[token_id])
        cut = sampled_p == 0.0
        text = tokenizer.decode([token_id])
        rows.append({
            "rank": rank, "id": token_id, "token": visible_token(text), "text": text,
            "label": f"{rank:02d}. {visible_token(text)}",  # zero-padded: the chart sorts its bars by label
            "model p": model_p, "sampled p": sampled_p, "cut": cut,
            "bar": model_p if cut else sampled_p, "status": "cut" if cut else "kept",
        })
    return pd.DataFrame(rows)


def explorer_summary(frame: pd.DataFrame, params: SamplingParams) -> str:
    """A line under the chart: how many of the shown tokens the settings keep, and how much mass they carry."""
    kept = frame[~frame["cut"]]
    settings = params.describe(DISTRIBUTION_FIELDS)
    mode = f"greedy: only the most likely token is kept; {settings}" if params.greedy else settings
    return (
        f"{len(kept)} of the top {len(frame)} tokens are kept ({mode}). They hold {kept['model p'].sum():.1%} of the model's probability and "
        f"{kept['sampled p'].sum():.1%} after the settings."
    )


# ------------------------------------------------------------------------------------------ expert routing


def routing_to_state(routing: Any, tokenizer, reply_only: bool = True) -> dict[str, Any] | None:
    """ExpertRouting -> a small dict of lists for the session state (the reply's tokens only, by default).

    The tensors are [layers, tokens, chosen experts] and small, so slicing them here is cheap on any thread.
    """
    if routing is None:
        return None
    start = routing.prompt_tokens if reply_only else 0
    token_ids = routing.token_ids[start:]
    return {
        "experts": routing.experts[:, start:].tolist(),
        "weights": routing.weights[:, start:].float().tolist(),
        "tokens": [tokenizer.decode([t]) for t in token_ids],
        "num_experts": int(routing.num_experts),
    }


def expert_load_frame(routing: dict[str, Any]) -> pd.DataFrame:
    """How many of the reply's tokens each expert served, per layer: rows (layer, expert, tokens, share)."""
    experts = torch.tensor(routing["experts"], dtype=torch.long)  # [layers, tokens, chosen experts]
    layers = experts.shape[0] if experts.ndim == 3 else 0
    rows = []
    for layer in range(layers):
        counts = torch.bincount(experts[layer].reshape(-1), minlength=routing["num_experts"]).tolist()
        total = max(1, sum(counts))
        for expert, count in enumerate(counts):
            rows.append({"layer": f"layer {layer}", "expert": f"E{expert:02d}", "tokens": count,
                         "share": count / total})
    return pd.DataFrame(rows, columns=["layer", "expert", "tokens", "share"])


def routing_heatmap_html(routing: dict[str, Any]) -> str:
    """Tokens × layers: each cell names the token's experts in that layer, shaded by the first expert's weight."""
    experts, weights, tokens = routing["experts"], routing["weights"], routing["tokens"]
    if not tokens or not experts:
        return "<p>No routed tokens in this reply.</p>"
    head = "".join(f"<th>layer {layer}</th>" for layer in range(len(experts)))
    rows = []
    for t, text in enumerate(tokens):
        cells = []
        for layer in range(len(experts)):
            picks = sorted(zip(experts[layer][t], weights[layer][t]), key=lambda pick: -pick[1])
            top_weight = picks[0][1]
            label = " · ".join(f"E{e:02d} {w:.2f}" for e, w in picks)
            # Shade: a confident split (one expert takes most weight) is darker than an even one.
            shade = 95 - 40 * max(0.0, min(1.0, (top_weight - 0.5) * 2))
            cells.append(f'<td style="background:hsl(210,70%,{shade:.0f}%)">{html.escape(label)}</td>')
        rows.append(f"<tr><th style='text-align:left'>{t + 1}. {html.escape(visible_token(text))}</th>{''.join(cells)}</tr>")
    return (
        '<div style="max-height:420px;overflow:auto"><table class="insight-routing" '
        'style="border-collapse:collapse;font-size:.85em;font-family:monospace">'
        f"<thead><tr><th>token</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "<p style='font-size:.85em'>Each cell: the two experts the token went to in that layer and their weights "
        "(they sum to 1); darker = one expert took more of the weight.</p>"
    )
