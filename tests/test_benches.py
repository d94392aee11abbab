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
    result = _run("int4_cpu_decode.py", "--tiny", "--steps", "4", "--contexts", "8", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("projected tok/s", "what a step is made of", "int4", "lm_head", "top PyTorch ops",
                     "projected resident memory", "relative L2 error of the logits", "routing decisions that differ"):
        assert expected in out, expected
    assert "_weight_int4pack_mm_for_cpu" in out  # the kernels really ran
    result_line = out.strip().splitlines()[-1]
    assert result_line.startswith("RESULT projected Yuan2-M32 INT4 CPU decode") and "not a measurement" in result_line


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
