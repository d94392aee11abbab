"""The Yuan tokenizer on the release's tokenizer files (../shared/yuan2-tokenizer)."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer, StopStringCriteria, TextIteratorStreamer

import playground.models.yuan  # noqa: F401 - registers the Auto classes
from playground.models.yuan.tokenization_yuan import YuanTokenizer, load_yuan_tokenizer


def test_reference_ids(yuan_tokenizer):
    assert yuan_tokenizer.encode("你好<sep>") == [29871, 38190, 77187]
    assert len(yuan_tokenizer) == 134958
    ids = yuan_tokenizer.convert_tokens_to_ids(
        ["<eod>", "<n>", "<sep>", "<pad>", "<mask>", "<predict>", "<FIM_SUFFIX>", "<FIM_PREFIX>", "<FIM_MIDDLE>"]
    )
    assert ids == [77185, 77186, 77187, 77188, 134953, 134954, 134955, 134956, 134957]
    assert yuan_tokenizer.eos_token_id == 77185 and yuan_tokenizer.eos_token == "<eod>"
    assert yuan_tokenizer.pad_token_id == 77188


def test_newlines_and_literal_markers(yuan_tokenizer):
    assert 13 in yuan_tokenizer.encode("a\nb")  # a real newline is the byte piece <0x0A>
    assert 77186 not in yuan_tokenizer.encode("a<n>b")  # typed "<n>" is text, not the <n> token
    assert yuan_tokenizer.encode("<eod>") == [77185]


def test_no_bos_or_eos_although_the_folder_asks_for_them(yuan_tokenizer, tokenizer_dir):
    folder_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert folder_config["add_bos_token"] and folder_config["add_eos_token"]
    ids = yuan_tokenizer("hello world")["input_ids"]
    assert ids[0] not in (1, 77185) and ids[-1] not in (2, 77185)
    assert yuan_tokenizer("hello world", add_special_tokens=True)["input_ids"] == ids


def test_reference_decoding_quirks(yuan_tokenizer):
    assert yuan_tokenizer.decode([29871, 38190, 77187]) == " 你好<sep>"
    assert yuan_tokenizer.decode([77188, 134953]) == "<pad> <mask>"
    assert yuan_tokenizer.decode(yuan_tokenizer.encode(" ")) == ""
    assert yuan_tokenizer.decode([29871, 38190, 77187], skip_special_tokens=True) == "你好"
    text = "def f(x):\n    return x * 2  # 双倍"
    assert yuan_tokenizer.decode(yuan_tokenizer.encode(text)) == text


def test_batch_padding_is_left_and_decodes_back(yuan_tokenizer):
    batch = yuan_tokenizer(["你好<sep>", "How are you today?<sep>"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())
    assert ids[0, 0] == yuan_tokenizer.pad_token_id
    assert yuan_tokenizer.batch_decode(ids, skip_special_tokens=True) == ["你好", "How are you today?"]


def test_vocab_and_token_conversion(yuan_tokenizer):
    vocab = yuan_tokenizer.get_vocab()
    assert len(vocab) == 134958 and vocab["<sep>"] == 77187 and vocab["<FIM_MIDDLE>"] == 134957
    assert yuan_tokenizer.convert_ids_to_tokens([29871, 38190, 77187]) == ["▁", "你好", "<sep>"]
    assert yuan_tokenizer.decode([135000, 38190]) == "你好"  # padded embedding rows decode to nothing


def test_stop_string_criteria_accepts_the_tokenizer(yuan_tokenizer):
    ids = yuan_tokenizer("答案是42。", return_tensors="pt")["input_ids"]
    criteria = StopStringCriteria(yuan_tokenizer, ["42。"])
    assert bool(criteria(ids, None).all())
    assert not bool(criteria(ids[:, :-1], None).any())


def test_streamer_text_matches_decode(full_vocab_model, yuan_tokenizer):
    model, _ = full_vocab_model
    inputs = yuan_tokenizer("你好<sep>", return_tensors="pt")
    streamer = TextIteratorStreamer(yuan_tokenizer, skip_prompt=True, skip_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == yuan_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_auto_tokenizer_for_saved_yuan_tokenizer(yuan_tokenizer, tmp_path, full_vocab_dir):
    yuan_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((full_vocab_dir / "config.json").read_text())
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "YuanTokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, YuanTokenizer)
    assert tokenizer.encode("你好<sep>") == [29871, 38190, 77187] and len(tokenizer) == 134958
    assert load_yuan_tokenizer(tmp_path).encode("<FIM_MIDDLE>") == [134957]


def test_padded_ids_feed_the_model(full_vocab_model, yuan_tokenizer):
    model, _ = full_vocab_model
    batch = yuan_tokenizer(["你好<sep>", "一二三四五<sep>"], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    single = model.generate(**yuan_tokenizer(["你好<sep>"], return_tensors="pt"), max_new_tokens=4,
                            min_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, -4:], single[0, -4:])
