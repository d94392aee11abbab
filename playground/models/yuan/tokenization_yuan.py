"""The Yuan2 tokenizer: sentencepiece plus the release's special tokens, reproducing its reference ids.

The release loads `tokenizer.model` as transformers 4's slow, legacy `LlamaTokenizer` with `eos_token='<eod>'` and
no BOS/EOS added, then adds its special tokens. transformers 5's `LlamaTokenizer` (tokenizers-backed) does not give
the same ids, and `AutoTokenizer` on the release folder adds `<s>`/`</s>` because its `tokenizer_config.json` turns
them on. This class does what the reference does: split the text on the special-token strings, encode each piece
with sentencepiece itself, map the specials to their ids. Decoding reproduces the reference's quirks (a space before
a special token that follows text, a space between the tokens appended after the sentencepiece vocabulary, a lone
leading `▁` dropped).

`AutoTokenizer` only picks this class for folders whose `tokenizer_config.json` names `YuanTokenizer` (e.g. saved
with `save_pretrained`); the release folder names `LlamaTokenizer`, so load it with `load_yuan_tokenizer(folder)`.
"""

from __future__ import annotations

from pathlib import Path

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "▁"

# Added by the release after loading, in this order. Those already in the sentencepiece model keep their ids;
# <mask> <predict> <FIM_SUFFIX> <FIM_PREFIX> <FIM_MIDDLE> get the new ids 134953..134957.
YUAN_SPECIAL_TOKENS = [
    "<sep>",
    "<pad>",
    "<mask>",
    "<predict>",
    "<FIM_SUFFIX>",
    "<FIM_PREFIX>",
    "<FIM_MIDDLE>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
]
EOD_TOKEN = "<eod>"
SEP_TOKEN = "<sep>"
NEWLINE_TOKEN = "<n>"  # an ordinary piece (77186): the chat format writes it for line breaks

# Settings a folder's tokenizer_config.json / special_tokens_map.json may carry that the release overrides.
_OVERRIDDEN_KWARGS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "mask_token",
    "cls_token",
    "add_bos_token",
    "add_eos_token",
    "legacy",
    "additional_special_tokens",
    "extra_special_tokens",
    "added_tokens_decoder",
    "special_tokens_pattern",
    "padding_side",
)


class YuanTokenizer(SentencePieceBackend):
    """Yuan2 tokenizer (slow, sentencepiece). Left-pads batches; never adds BOS/EOS."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str, **kwargs):
        for key in _OVERRIDDEN_KWARGS:
            kwargs.pop(key, None)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        self._base_vocab: dict[str, int] | None = None
        super().__init__(
            vocab_file=vocab_file,
            bos_token="<s>",
            eos_token=EOD_TOKEN,
            unk_token="<unk>",
            pad_token="<pad>",
            legacy=True,
            special_tokens_pattern="none",
            padding_side="left",
            **kwargs,
        )
        self.add_tokens(YUAN_SPECIAL_TOKENS, special_tokens=True)

    # -- vocabulary --------------------------------------------------------------------------------------------------

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            # 135k pieces: build once, transformers asks for the vocab after every added token.
            self._base_vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_model.get_piece_size())}
        return {**self._base_vocab, **self._added_tokens_encoder}

    def _convert_id_to_token(self, index: int) -> str:
        # Ids past the vocabulary exist in the padded embedding (135040 rows); they decode to nothing.
        if 0 <= index < self.sp_model.get_piece_size():
            return self.sp_model.id_to_piece(index)
        return ""

    # -- encoding ----------------------------------------------------------------------------------------------------

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # Each piece between special tokens is encoded on its own, so it gets sentencepiece's dummy "▁" prefix.
        return self.sp_model.encode(text, out_type=str)

    # -- decoding (the reference's legacy behaviour) ------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]  # the prefix sentencepiece added when encoding
        special = set(self.all_special_tokens)
        text = ""
        pieces: list[str] = []
        previous_special = False
        for position, token in enumerate(tokens):
            if token in special:
                if not previous_special and position != 0:
                    text += " "
                text += self.sp_model.decode(pieces) + token
                pieces = []
                previous_special = True
            else:
                if previous_special and position == 1 and not token.startswith(SPIECE_UNDERLINE):
                    text += " "
                pieces.append(token)
                previous_special = False
        return text + self.sp_model.decode(pieces)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        tokens = self.convert_ids_to_tokens(list(token_ids), skip_special_tokens=skip_special_tokens)
        # Tokens appended after the sentencepiece vocabulary are kept apart and joined with spaces.
        appended = {token for token, index in self._added_tokens_encoder.items() if index >= self.vocab_size}
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in appended:
                if run:
                    text = self.convert_tokens_to_string(run)
                    if text:
                        parts.append(text)
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text


def load_yuan_tokenizer(folder: str | Path) -> YuanTokenizer:
    """The project's way to load a Yuan tokenizer from a model folder (release layout or saved by this class)."""
    folder = Path(folder)
    return YuanTokenizer.from_pretrained(str(folder), local_files_only=True)


__all__ = ["YuanTokenizer", "load_yuan_tokenizer", "YUAN_SPECIAL_TOKENS", "EOD_TOKEN", "SEP_TOKEN", "NEWLINE_TOKEN"]
