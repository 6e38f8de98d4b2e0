"""Tiny, randomly initialised models with a small BPE tokenizer: built offline in a second.

They train through the same code as a real model (chat template, PEFT, Opacus) at a
fraction of the cost, for tests and for checks that must run where no model can be fetched
(``benchmarks/gpu_check.py`` on a GPU machine without network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedtune.demo.data import generate_examples

TinyFamily = Literal["llama", "qwen2"]

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Hidden size 64, 2 layers: a few hundred kilobytes of weights.
SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE trained on the demo data, with a ChatML template."""
    corpus = [
        m["content"]
        for domain in ("hospital", "bank")
        for example in generate_examples(domain, 200, seed=1)
        for m in example["messages"]
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(
    vocab_size: int, *, family: TinyFamily = "llama", seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` (the same weights for the same seed)."""
    torch.manual_seed(seed)
    model: PreTrainedModel
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **SMALL))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **SMALL))
    return model.eval()


def save_tiny_model_dir(path: Path, *, family: TinyFamily = "llama", seed: int = 0) -> Path:
    """A tiny model and its tokenizer saved as a Hugging Face directory (a model spec)."""
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), family=family, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
