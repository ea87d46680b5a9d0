"""Shared fixtures: tiny random GPT-2 and Llama models with a tiny tokenizer, saved as local dirs."""

import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).parents[1]
SHARED_DATA = Path(os.environ.get("ENCORE_PL_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def tiny_config(kind: str, vocab: int):
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=32, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
        )
    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )


def make_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(kind, len(tok))
    model = (GPT2LMHeadModel if kind == "gpt2" else LlamaForCausalLM)(config)
    # A random model's logits are nearly flat; a larger head lets target vectors move predictions.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def free_port() -> int:
    """A TCP port nobody listens on now (for a DDP run's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A DownstreamEvaluation for tiny runs (format with glue=, text=), added to a run config.
DOWNSTREAM = """
trainer:
  callbacks:
    - class_path: encore_pl.callbacks.DownstreamEvaluation
      init_args: {{every_n_batches: 1, tasks: [sst2, mmlu], data_dir: {glue}, k_shot: 2, n_items: 4,
                  perplexity_file: {text}, perplexity_tokens: 256}}
"""
