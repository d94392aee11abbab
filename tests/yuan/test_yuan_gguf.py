"""The vendor's GGUF files (f16 and Q4_0 with a Q6_K output, whole or byte-split) read into the native model.

Tiny files are written in the vendor's layout with gguf-py's writer (make_tiny_gguf). Their twins are HF folders:
for f16 the make_tiny float folder of the same random weights; for Q4_0 a float32 folder of the GGUF's tensors as
gguf-py itself dequantises them (an independent reading of the blocks).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gradio_client import Client

from harness import ServedApp
from playground.errors import ModelFolderError
from playground.models.yuan import load_yuan
from playground.models.yuan.gguf_yuan import find_gguf_parts, native_name, read_gguf, tokenizer_from_gguf
from playground.models.yuan.gptq import QuantLinear
from playground.models.yuan.make_tiny import (
    make_tiny_checkpoint,
    tiny_config_dict,
    write_folder_files,
    write_safetensors,
)
from playground.models.yuan.make_tiny_gguf import make_tiny_gguf

PROMPT = torch.tensor([[29871, 38190, 77187, 1000, 2000, 3000, 40000, 77185, 12, 500]])
CORPUS = [
    "你好<sep>", "Hello, world!\nSecond line\ttab", "def f(x):\n    return x ** 2  # square",
    "混合 English 与中文的句子，还有数字 12345 和符号 ©®™。", "<eod><n><sep><pad><mask><FIM_PREFIX>", "   spaces   ",
    "emoji 😀 and accents: café, naïve, Zürich", "",
]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf")
    f16 = make_tiny_gguf(root / "f16", tokenizer_dir=tokenizer_dir)[0]
    q4_parts = make_tiny_gguf(root / "q4", q4=True, parts=3, tokenizer_dir=tokenizer_dir)
    return {"root": root, "f16": f16, "q4_parts": q4_parts,
            "f16_twin": make_tiny_checkpoint(root / "f16-twin", tokenizer_dir=tokenizer_dir)}


@pytest.fixture(scope="module")
def q4_twin(files, tokenizer_dir):
    """The Q4_0 GGUF as an HF float32 folder, each tensor dequantised by gguf-py (joined parts, read by GGUFReader)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    root = files["root"]
    joined = root / "joined.gguf"
    joined.write_bytes(b"".join(part.read_bytes() for part in files["q4_parts"]))
    reader = GGUFReader(joined)
    state = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        state[native_name(tensor.name)] = torch.from_numpy(np.array(values, dtype=np.float32))
    header = read_gguf(files["q4_parts"][0])
    folder = root / "q4-twin"
    write_folder_files(folder, tiny_config_dict(), tokenizer_dir, None)
    specs = [(name, torch.float32, tuple(value.shape)) for name, value in state.items()]
    write_safetensors(specs, state.__getitem__, folder, "model.safetensors")
    assert len(header.tensors) == len(state)
    return folder


def test_f16_gguf_equals_its_hf_folder(files):
    from_gguf, tokenizer = load_yuan(files["f16"], dtype=torch.float32)
    from_folder, _ = load_yuan(files["f16_twin"], dtype=torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(from_gguf(PROMPT).logits, from_folder(PROMPT).logits, rtol=1e-4, atol=1e-4)
        greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(from_gguf.generate(PROMPT, **greedy), from_folder.generate(PROMPT, **greedy))
    # The stored output is the embedding's copy: tied again, as in the HF folder.
    assert from_gguf.lm_head.weight is from_gguf.model.embed_tokens.weight
    assert tokenizer.encode("你好<sep>") == [29871, 38190, 77187]


def test_q4_gguf_parts_load_on_int4_kernels_and_match_the_dequantised_twin(files, q4_twin):
    first = files["q4_parts"][0]
    exact, _ = load_yuan(first, dtype=torch.float32, with_tokenizer=False)
    twin, _ = load_yuan(q4_twin, dtype=torch.float32, with_tokenizer=False)
    fast, _ = load_yuan(first.parent, with_tokenizer=False)  # the folder holding the parts; default precision
    quantized = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert quantized and {m.group_size for m in quantized} == {32}
    kernels = {m.kernel.name if m.kernel else "exact" for m in quantized}
    assert "exact" not in kernels and "dense-float32" in kernels  # the routers take their fp32 copy
    with torch.inference_mode():
        reference = twin(PROMPT).logits
        torch.testing.assert_close(exact(PROMPT).logits, reference, rtol=1e-4, atol=1e-4)
        assert _relative_error(fast(PROMPT).logits.float(), reference) < 0.05
        greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(exact.generate(PROMPT, **greedy), twin.generate(PROMPT, **greedy))
    # Q4_0 embedding and Q6_K head are different tensors: not tied.
    assert exact.lm_head.weight is not exact.model.embed_tokens.weight


def test_parts_are_found_from_any_entry_point(files):
    parts = files["q4_parts"]
    assert find_gguf_parts(parts[0]) == parts == find_gguf_parts(parts[0].parent) == find_gguf_parts(parts[2])
    assert [p.read_bytes()[:4] == b"GGUF" for p in parts] == [True, False, False]
    assert find_gguf_parts(files["f16"]) == [files["f16"]]


def test_config_and_tokenizer_come_from_the_file(files, yuan_tokenizer):
    gguf_file = read_gguf(files["f16"])
    assert gguf_file.metadata["general.architecture"] == "yuan2_moe"
    from playground.models.yuan.gguf_yuan import config_from_gguf

    config = config_from_gguf(gguf_file)
    expected = tiny_config_dict()
    assert (config.hidden_size, config.num_hidden_layers, config.num_experts, config.head_dim, config.vocab_size) == (
        expected["hidden_size"], expected["num_hidden_layers"], expected["moe_config"]["moe_num_experts"],
        expected["attention_projection_size"] // expected["num_attention_heads"], expected["vocab_size"])
    rebuilt = tokenizer_from_gguf(gguf_file)
    for text in CORPUS:
        assert rebuilt.encode(text) == yuan_tokenizer.encode(text), text
        ids = yuan_tokenizer.encode(text)
        assert rebuilt.decode(ids) == yuan_tokenizer.decode(ids)
    assert rebuilt.eos_token_id == 77185 and len(rebuilt) == len(yuan_tokenizer)


def test_release_tokenizer_files_beside_the_gguf_win(files, tokenizer_dir, monkeypatch):
    import playground.models.yuan.loading as loading

    folder = files["q4_parts"][0].parent
    (folder / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    built = []
    monkeypatch.setattr(loading, "tokenizer_from_gguf", lambda *a: built.append(a))
    try:
        _, tokenizer = load_yuan(folder)
        assert tokenizer.encode("你好<sep>") == [29871, 38190, 77187] and not built
    finally:
        (folder / "tokenizer.model").unlink()


# ---------------------------------------------------------------------------------------------------------------------
# Bad files: clear errors naming what is wrong


def test_a_missing_or_truncated_part_is_named(files, tmp_path):
    parts = [tmp_path / p.name for p in files["q4_parts"]]
    for source, target in zip(files["q4_parts"], parts):
        target.write_bytes(source.read_bytes())
    parts[1].unlink()
    with pytest.raises(ModelFolderError, match=r"missing GGUF part tiny-yuan-q4_0-01\.gguf"):
        load_yuan(parts[0])
    parts[1].write_bytes(files["q4_parts"][1].read_bytes())
    parts[2].write_bytes(files["q4_parts"][2].read_bytes()[:-1000])
    with pytest.raises(ModelFolderError, match=r"tiny-yuan-q4_0-02\.gguf is truncated"):
        load_yuan(parts[0])


@pytest.mark.parametrize("change, message", [
    (dict(arch="llama"), r"architecture 'llama' is not Yuan2-M32's GGUF \('yuan2_moe'\)"),
    (dict(types={"blk.0.attn_v.weight": 8}), r"tensor blk\.0\.attn_v\.weight is Q8_0"),
    (dict(drop=["blk.1.ffn_down.3.weight"]), r"missing tensor model\.layers\.1\.mlp\.experts\.3\.w2\.weight"),
])
def test_bad_files_are_refused_by_name(tmp_path, tokenizer_dir, change, message):
    path = make_tiny_gguf(tmp_path, tokenizer_dir=tokenizer_dir, **change)[0]
    with pytest.raises(ModelFolderError, match=message):
        load_yuan(path)


def test_a_bad_gguf_leaves_the_loaded_model_serving(new_manager, files, tmp_path):
    manager = new_manager()
    manager.load(str(files["f16"]))
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelFolderError):
        manager.load(str(bad))
    status = manager.status()
    assert status["state"] == "ready" and status["name"] == files["f16"].stem
    assert manager.generate(prompt="你好", params={"temperature": 0, "max_new_tokens": 4}).text is not None
    assert json.dumps(status)  # the status stays serialisable with the error in it


def test_the_model_panel_loads_gguf_sets_and_survives_a_broken_one(files, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(files["f16"], root / "tiny-yuan.gguf")
    for part in files["q4_parts"]:
        shutil.copy(part, root / part.name)
    broken = root / "broken"
    broken.mkdir()
    for part in files["q4_parts"][::2]:  # part 01 missing
        shutil.copy(part, broken / part.name)
    from playground.ui.model_panel import model_choices

    # A byte-split set is one choice, by its first part.
    assert model_choices(str(root)) == ["embedded", "broken", "tiny-yuan-q4_0-00.gguf", "tiny-yuan.gguf"]
    server = ServedApp("--model", str(root / "tiny-yuan.gguf"), "--models-root", str(root))
    try:
        assert server.wait_until(("ready",))["name"] == "tiny-yuan"
        client = Client(server.url, verbose=False)
        failed = client.predict("broken", api_name="/model_load")
        assert failed.startswith("⚠️") and "missing GGUF part tiny-yuan-q4_0-01.gguf" in failed
        status = server.status()
        assert status["state"] == "ready" and status["name"] == "tiny-yuan"  # the loaded model stayed
        loaded = client.predict("tiny-yuan-q4_0-00.gguf", api_name="/model_load")
        assert loaded.startswith("✅ Loaded") and server.status()["name"] == "tiny-yuan-q4_0"
        chat = client.predict("你好", "", 0.0, 0.9, 50, 0.0, 1.0, 1.0, 0, 6, 1, "", api_name="/chat")
        assert chat[1].startswith("Done:")
    finally:
        server.stop()
