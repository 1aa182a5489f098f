"""Tiny stand-ins for pretrained language models, written by the tests themselves (no hub
here): a 4-layer Llama with a word-level tokenizer, saved with `save_pretrained`."""
from __future__ import annotations

from pathlib import Path

import torch

from slmrec.model import PROMPT

HIDDEN, HEADS, FULL_DEPTH = 16, 2, 4


def save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for word in PROMPT.split():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def save_tiny_llama(directory: Path, tokenizer: bool = True, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM checkpoint (full depth FULL_DEPTH)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=40,
                         num_hidden_layers=FULL_DEPTH, num_attention_heads=HEADS,
                         num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(directory)
    if tokenizer:
        save_tiny_tokenizer(directory)
    return Path(directory)
