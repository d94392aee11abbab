"""What the embedded-model rate benches share: their options, the model loaded through the manager, fixed-length
sampling settings and the header line. Each bench then times its two paths against each other."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playground.manager import ModelManager  # noqa: E402
from playground.params import SamplingParams  # noqa: E402


def load_for_rates(description: str):
    """Parse --model/--tokens/--rounds, load the model and print the header; returns (args, manager, status, params).

    min_new_tokens holds the end token off, so every round generates exactly --tokens tokens and the rates compare.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manager = ModelManager()
    # Loaded on a thread of its own, as the server loads: torch work on the main thread first (the int4 layers'
    # checks) would slow every later generation thread (ModelManager.load_on_thread says why).
    status = manager.load_on_thread(args.model).result()
    manager.loaded.model.generation_config.min_new_tokens = args.tokens
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=args.tokens, seed=1234)
    print(f"model {status['name']} ({status['kind']}, {status['dtype']} on {status['device']}), "
          f"{args.tokens} new tokens, seed {params.seed}, {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    return args, manager, status, params
