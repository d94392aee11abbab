"""Model folders: float and INT4 loading, byte-split parts, Auto classes without remote code, error messages."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from playground.errors import ModelFolderError
from playground.models.yuan import YuanConfig, YuanForCausalLM, check_yuan_folder, is_yuan_folder, load_yuan
from playground.models.yuan.gptq import QuantLinear
from playground.models.yuan.loading import QUANTIZED_LINEAR
from playground.models.yuan.make_tiny import main as make_tiny_main

PROMPT = torch.tensor([[17, 4, 230, 1999, 5, 64]])
PARTS = [f"gptq_model-4bit-128g.safetensors0{i}" for i in range(3)]


def _copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_is_yuan_folder(tiny_float_dir, tmp_path):
    assert is_yuan_folder(tiny_float_dir)
    assert not is_yuan_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_yuan_folder(tmp_path)
    assert not is_yuan_folder(tmp_path / "nowhere")


def test_float_folder_loads_like_transformers_loader(tiny_float_dir, caplog):
    with caplog.at_level(logging.WARNING):
        model, tokenizer = load_yuan(tiny_float_dir)
        reference = AutoModelForCausalLM.from_pretrained(tiny_float_dir, dtype=torch.float32)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert isinstance(reference, YuanForCausalLM) and model.dtype == torch.float32
    # The stored lm_head equals the embedding: both loaders keep it tied, no warning, same logits.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)
    assert tokenizer.encode("你好<sep>") == [29871, 38190, 77187]


def test_auto_classes_ignore_the_remote_code(tiny_float_dir, tiny_int4_dir):
    config_json = json.loads((tiny_float_dir / "config.json").read_text())
    assert "auto_map" in config_json and config_json["use_flash_attention"] is True
    # The folder's remote-code files raise if executed; loading must never import them.
    assert "raise RuntimeError" in (tiny_float_dir / "yuan_hf_model.py").read_text()
    assert isinstance(AutoConfig.from_pretrained(tiny_float_dir), YuanConfig)
    assert isinstance(AutoConfig.from_pretrained(tiny_float_dir, trust_remote_code=False), YuanConfig)
    model = AutoModelForCausalLM.from_pretrained(tiny_float_dir, trust_remote_code=False)
    assert type(model) is YuanForCausalLM
    int4 = AutoModelForCausalLM.from_pretrained(tiny_int4_dir, trust_remote_code=False)
    assert isinstance(int4.model.layers[0].self_attn.q_proj, QuantLinear)


def test_int4_weights_stay_packed_in_exact_mode(tiny_int4_dir, small_config):
    model, _ = load_yuan(tiny_int4_dir, dtype=torch.float32)
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    expected = {name for name, _ in model.named_modules() if QUANTIZED_LINEAR.match(name)}
    layers, experts = small_config.num_hidden_layers, small_config.num_experts
    assert quantized == expected and len(quantized) == layers * (4 + 3 + 2 * experts)
    for name in quantized:
        module = model.get_submodule(name)
        assert module.qweight.dtype == torch.int32 and module.scales.dtype == torch.float16
        assert not any(t.is_floating_point() and t.dim() == 2 and t.shape[0] == module.out_features
                       for t in module.buffers() if t is not module.scales)
        assert module.kernel is None  # exact mode dequantises per call
    # Embedding, norms and the LFA convolutions stay float (float32 compute on CPU).
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.lf_gate.conv1.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_int4_logits_close_to_float_model_of_dequantised_weights(tiny_int4_dir, dequantised_copy):
    model, _ = load_yuan(tiny_int4_dir, dtype=torch.float32)
    reference = dequantised_copy(model)
    assert not any(isinstance(m, QuantLinear) for m in reference.modules())
    got, expected = model(PROMPT).logits, reference(PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(
        model.generate(PROMPT, max_new_tokens=8, do_sample=False), reference.generate(PROMPT, max_new_tokens=8, do_sample=False)
    )


def test_split_parts_load_like_a_single_file(tiny_int4_dir, tmp_path):
    single = _copy_folder(tiny_int4_dir, tmp_path / "single")
    with open(single / "gptq_model-4bit-128g.safetensors", "wb") as joined:
        for part in PARTS:
            joined.write((single / part).read_bytes())
            (single / part).unlink()
    # Exact mode keeps the GPTQ tensors, so the state dicts can be compared byte for byte.
    parted_model, _ = load_yuan(tiny_int4_dir, dtype=torch.float32)
    single_model, _ = load_yuan(single, dtype=torch.float32)
    parted_state, single_state = parted_model.state_dict(), single_model.state_dict()
    assert parted_state.keys() == single_state.keys()
    assert all(torch.equal(parted_state[k], single_state[k]) for k in parted_state)
    assert torch.equal(parted_model(PROMPT).logits, single_model(PROMPT).logits)
    # The parts really split tensors: the boundaries fall inside tensor data, not between files' tensors.
    assert len({(tiny_int4_dir / p).stat().st_size for p in PARTS}) <= 2


def test_load_reuses_a_checked_folder(tiny_int4_dir):
    checked = check_yuan_folder(tiny_int4_dir)
    assert checked.quantized and checked.tie_lm_head and checked.weights_bytes > 0
    first, _ = load_yuan(checked, with_tokenizer=False)
    second, tokenizer = load_yuan(checked)
    assert first.config is not second.config and tokenizer is not None
    assert torch.equal(first(PROMPT).logits, second(PROMPT).logits)


def test_progress_is_reported(tiny_int4_dir):
    calls = []
    load_yuan(tiny_int4_dir, progress=lambda fraction, message: calls.append((fraction, message)))
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any("weights" in message for _, message in calls) and len(calls) >= 5


def test_stored_lm_head_that_differs_loads_untied(tiny_float_dir, tmp_path):
    folder = _copy_folder(tiny_float_dir, tmp_path / "untied")
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = (state["lm_head.weight"].float() * -0.5).to(torch.bfloat16)
    save_file(state, folder / "model.safetensors")
    for model in (load_yuan(folder)[0], AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)):
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert torch.equal(model.lm_head.weight, state["lm_head.weight"].float())
        hidden = model.model(PROMPT).last_hidden_state
        torch.testing.assert_close(model(PROMPT).logits, hidden @ state["lm_head.weight"].float().T)


# -- folder errors ------------------------------------------------------------------------------------------------


def _expect_error(folder: Path, *fragments: str) -> None:
    with pytest.raises(ModelFolderError) as error:
        check_yuan_folder(folder)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_missing_files_are_named(tiny_int4_dir, tmp_path):
    for name, fragment in (("config.json", "missing config.json"), ("tokenizer.model", "missing tokenizer.model")):
        folder = _copy_folder(tiny_int4_dir, tmp_path / name)
        (folder / name).unlink()
        _expect_error(folder, fragment)
    folder = _copy_folder(tiny_int4_dir, tmp_path / "no-weights")
    for part in PARTS:
        (folder / part).unlink()
    _expect_error(folder, "missing weights", "gptq_model-4bit-128g.safetensors00")
    _expect_error(tmp_path / "absent", "model folder not found")


def test_truncated_or_missing_parts_are_named(tiny_int4_dir, tmp_path):
    folder = _copy_folder(tiny_int4_dir, tmp_path / "short-last")
    data = (folder / PARTS[2]).read_bytes()
    (folder / PARTS[2]).write_bytes(data[: len(data) // 2])
    _expect_error(folder, PARTS[2], "truncated")
    with pytest.raises(ModelFolderError, match="truncated"):
        load_yuan(folder)

    folder = _copy_folder(tiny_int4_dir, tmp_path / "short-middle")
    data = (folder / PARTS[1]).read_bytes()
    (folder / PARTS[1]).write_bytes(data[:-100])
    _expect_error(folder, PARTS[1], "truncated")

    folder = _copy_folder(tiny_int4_dir, tmp_path / "gap")
    (folder / PARTS[1]).unlink()
    _expect_error(folder, "missing weight part", PARTS[1])

    folder = _copy_folder(tiny_int4_dir, tmp_path / "last-gone")
    (folder / PARTS[2]).unlink()
    _expect_error(folder, PARTS[1], "truncated")


def test_bad_header_and_missing_tensor_are_named(tiny_float_dir, tmp_path):
    folder = _copy_folder(tiny_float_dir, tmp_path / "bad-header")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:24] = b"{not json at all"
    (folder / "model.safetensors").write_bytes(bytes(data))
    _expect_error(folder, "model.safetensors", "header does not parse")

    folder = _copy_folder(tiny_float_dir, tmp_path / "missing-tensor")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.lf_gate.conv2.bias"]
    save_file(state, folder / "model.safetensors")
    _expect_error(folder, "model.safetensors", "missing tensor model.layers.1.self_attn.lf_gate.conv2.bias")

    folder = _copy_folder(tiny_float_dir, tmp_path / "wrong-shape")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    _expect_error(folder, "model.safetensors", "shape")


def test_bad_config_files_are_named(tiny_int4_dir, tmp_path):
    folder = _copy_folder(tiny_int4_dir, tmp_path / "bad-quant")
    quantize = json.loads((folder / "quantize_config.json").read_text())
    quantize["bits"] = 3
    (folder / "quantize_config.json").write_text(json.dumps(quantize))
    _expect_error(folder, "quantize_config.json", "bits 3")
    # Bits the loader knows, but not the ones the tensors were packed with: the shapes say so.
    quantize["bits"] = 8
    (folder / "quantize_config.json").write_text(json.dumps(quantize))
    _expect_error(folder, "q_proj.qweight", "bits 8")

    folder = _copy_folder(tiny_int4_dir, tmp_path / "not-yuan")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    _expect_error(folder, "config.json", "'llama'")

    folder = _copy_folder(tiny_int4_dir, tmp_path / "broken-json")
    (folder / "config.json").write_text("{")
    _expect_error(folder, "config.json", "not valid JSON")


def test_make_tiny_command_line(tmp_path, tokenizer_dir, capsys):
    args = ["--vocab", "4096", "--hidden", "128", "--heads", "2", "--projection", "256", "--layers", "1",
            "--ffn", "128", "--experts", "8"]
    assert make_tiny_main([str(tmp_path / "cli"), "--int4", "--tokenizer-dir", str(tokenizer_dir), *args]) == 0
    folder = check_yuan_folder(tmp_path / "cli")
    assert folder.quantized and folder.config.num_hidden_layers == 1
    assert sorted(p.name for p in (tmp_path / "cli").glob("gptq_model-4bit-128g.safetensors*")) == PARTS
    assert make_tiny_main([str(tmp_path / "x"), "--tokenizer-dir", str(tmp_path / "nowhere"), *args]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert make_tiny_main([str(tmp_path / "y"), "--int4", "--hidden", "96", "--tokenizer-dir", str(tokenizer_dir)]) == 2


def test_the_model_file_does_not_import_the_loader():
    """The loader imports the model (and routes its from_pretrained), never the other way round."""
    import ast

    import playground.models.yuan.modeling_yuan as modeling

    tree = ast.parse(open(modeling.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name and name.endswith("loading")}
    assert YuanForCausalLM.from_pretrained.__func__.__module__ == "playground.models.yuan.loading"
