"""The decode benchmarks run end to end (on toy-sized layers: this checks the scripts, the figures come from
running them at release size, see the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.slow
def test_cpu_decode_bench_reports_speed_memory_profile_and_quality():
    result = _run("int4_cpu_decode.py", "--tiny", "--threads", "1", "--steps", "4", "--contexts", "8", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("projected tok/s", "what a step is made of", "int4", "lm_head", "top PyTorch ops",
                     "projected resident memory", "relative L2 error of the logits", "routing decisions that differ",
                     "decoding as the chat does", "top-5 logprobs", "no logprobs"):
        assert expected in out, expected
    assert "_weight_int4pack_mm_for_cpu" in out  # the kernels really ran
    result_line = out.strip().splitlines()[-1]
    assert result_line.startswith("RESULT projected Yuan2-M32 INT4 CPU decode") and "not a measurement" in result_line


@pytest.mark.slow
def test_cpu_prefill_bench_reports_speed_profile_memory_and_routing():
    result = _run("int4_cpu_prefill.py", "--tiny", "--threads", "1", "--repeats", "2", "--lengths", "64", "96",
                  "--chunk", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("chunks of 32 tokens", "projected tok/s", "peak RSS growth MB", "what a prefill is made of",
                     "expert w1/w2 (int4)", "top PyTorch ops", "rows per expert and chunk"):
        assert expected in out, expected
    assert "_weight_int4pack_mm_for_cpu" in out  # the kernels really ran
    result_line = out.strip().splitlines()[-1]
    assert result_line.startswith("RESULT projected prefill") and "not a measurement" in result_line


@pytest.mark.slow
def test_gpu_decode_bench_runs_its_code_on_cpu_and_says_when_there_is_no_gpu():
    result = _run("gpu_decode.py", "--device", "cpu", "--tiny", "--steps", "3", "--contexts", "8", "32")
    assert result.returncode == 0, result.stderr
    assert "ms/layer" in result.stdout and "KV cache at 4096 positions" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("RESULT cpu: projected Yuan2-M32 INT4 batch-1 decode")
    if not torch.cuda.is_available():
        missing = _run("gpu_decode.py", "--tiny")
        assert missing.returncode == 2 and "no CUDA device" in missing.stdout


@pytest.mark.slow
def test_structured_output_bench_reports_the_cost_of_a_json_schema():
    result = _run("structured_output.py", "--tokens", "8", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "compile: first" in out and "round 1: free" in out and "ms per token" in out
    result_line = out.strip().splitlines()[-1]
    assert result_line.startswith("RESULT structured output on SmolLM2-135M-Instruct") and "ratio" in result_line


@pytest.mark.slow
def test_prompt_reuse_bench_reports_turns_regenerate_and_the_lab():
    result = _run("prompt_reuse.py", "--tiny", "--threads", "1", "--layers", "2", "--prompt-tokens", "64",
                  "--reply-tokens", "4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "shared prefill (prompt cache)" in out and "each setting prefills" in out
    table = {}  # request -> (prompt tokens, from the cache)
    for line in out.splitlines():
        for name in ("turn 1", "turn 2", "Regenerate"):
            fields = line.strip()[len(name):].split()
            if line.strip().startswith(name) and fields[0].isdigit():
                table[name] = (int(fields[0]), int(fields[1]))
    assert table["turn 1"][1] < table["turn 1"][0] // 2  # new text: computed
    assert 0 < table["turn 2"][1] < table["turn 2"][0]  # resumed inside turn 1 (Yuan's format)
    assert table["Regenerate"][1] == table["Regenerate"][0] - 1  # all of the prompt but its last token
    assert out.strip().splitlines()[-1].startswith("RESULT projected TTFT turn 2")


@pytest.mark.slow
def test_reply_memory_bench_measures_with_and_without_logprobs():
    result = _run("reply_memory.py", "--tokens", "24", "--threads", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "logprobs 5" in out and "no logprobs" in out and "24 token details kept" in out
    assert out.strip().splitlines()[-1].startswith("RESULT peak memory growth of a 24-token reply with logprobs 5")
