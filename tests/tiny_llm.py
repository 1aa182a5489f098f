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


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 GGUF of a tiny 2-layer Llama with a byte-level BPE vocabulary, laid out as
    llama.cpp's converter writes it (q/k rows permuted for its rotary layout); returns the
    Hugging Face state dict (LlamaForCausalLM names) the file encodes."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    hidden, heads, kv_heads, ffn, depth = 16, 2, 1, 24, 2
    byte_tokens = sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_tokens + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    vocab = len(tokens)

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    state = {"model.embed_tokens.weight": rand(vocab, hidden),
             "model.norm.weight": 1 + rand(hidden)}
    names = {"self_attn.q_proj": ("attn_q", hidden), "self_attn.k_proj": ("attn_k", hidden // heads * kv_heads),
             "self_attn.v_proj": ("attn_v", hidden // heads * kv_heads), "self_attn.o_proj": ("attn_output", hidden),
             "mlp.gate_proj": ("ffn_gate", ffn), "mlp.up_proj": ("ffn_up", ffn)}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(depth)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)

    def add(name: str, tensor: torch.Tensor) -> None:
        writer.add_tensor(name, tensor.numpy().astype("float32"))

    def rotary_layout(w: torch.Tensor, n_head: int) -> torch.Tensor:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(depth):
        prefix = f"model.layers.{i}."
        for hf, (gg, rows) in names.items():
            w = rand(rows, hidden) if hf != "self_attn.o_proj" else rand(hidden, hidden)
            state[prefix + hf + ".weight"] = w
            if gg == "attn_q":
                w = rotary_layout(w, heads)
            elif gg == "attn_k":
                w = rotary_layout(w, kv_heads)
            add(f"blk.{i}.{gg}.weight", w)
        state[prefix + "mlp.down_proj.weight"] = rand(hidden, ffn)
        add(f"blk.{i}.ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
        for hf, gg in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
            state[prefix + hf + ".weight"] = 1 + rand(hidden)
            add(f"blk.{i}.{gg}.weight", state[prefix + hf + ".weight"])
    add("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state
