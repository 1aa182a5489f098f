"""A LLaMA decoder's forward for recommendation: the shared prompt run once per batch, and
for ranking the last layer run only where it is read.

The instruction prompt is the same tokens at the same positions for every user, and
attention is causal, so its states and its keys and values at every layer do not depend on
the user: they are computed once (batch 1) and every user's items attend to them. Training
and inference both take this path. On SmolLM2-135M (14 prompt tokens, 8 layers, 32 users)
it cut an inference batch by 7% for 200-item histories and 34% for 20-item ones
(bench/user_state_paths.py). (LoRA dropout, where on, then draws one mask for the prompt per
batch instead of one per user.)

Ranking reads one position per user (the last item's post-norm state), yet a plain forward
runs every layer at every position. Each earlier layer must run everywhere (later
positions attend to all of them), but the LAST layer's output is read at one position: its
keys and values are still needed at every position, its query, attention output, MLP and
final norm only at the read one. That is most of a layer: at SmolLM2's shape and 200-item
histories it saved 44% of a 2-layer model's time and 7% of an 8-layer one's, so it also
widens the student's inference lead, which is the point of the method.

Supported: LLaMA-architecture decoders (`LlamaModel`, which SmolLM2 and the scratch
backbone are, LoRA-injected or merged); `SeqRecommender` runs transformers' own forward for
any other architecture (where the attention may hold extras such as q/k norms or sliding
windows that this path would not reproduce). The tests hold this path equal to
transformers' forward, values and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, rotate_half

KeysValues = tuple[torch.Tensor, torch.Tensor]


def supported(decoder: nn.Module) -> bool:
    """True when `decoder_states` reproduces `decoder`'s own forward exactly."""
    return isinstance(decoder, LlamaModel) and all(
        type(layer) is LlamaDecoderLayer for layer in decoder.layers)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _keys_values(layer: LlamaDecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 normed: bool = False) -> KeysValues:
    """`layer`'s keys (rotated) and values [B, kv_heads, L, d] of the positions of `hidden`
    [B, L, H] (its input, or with `normed` its input after the layer's input norm)."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    x = hidden if normed else layer.input_layernorm(hidden)
    keys = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    values = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    return _rope(keys, cos.unsqueeze(1), sin.unsqueeze(1)), values


def _layer(layer: LlamaDecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           past: KeysValues | None, read_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KeysValues]:
    """`layer` over `hidden` [B, L, H] (rotary tables of its positions: cos, sin [1, L, d]),
    each position attending to the prefix's keys and values `past` ([1, kv_heads, P, d]
    each; None: no prefix) and causally to `hidden`'s own positions, as LlamaDecoderLayer
    computes it. Returns the output at every position [B, L, H], or with `read_at` only at
    position read_at[b] of each row [B, H], and the keys and values of `hidden`'s positions."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)
    keys, values = _keys_values(layer, normed, cos, sin, normed=True)
    positions = torch.arange(length, device=hidden.device)
    # Plain causal attention (no prefix, every query) needs no mask tensor: the faster kernel.
    plain = past is None and read_at is None
    visible = None
    if read_at is None:
        residual, query_in = hidden, normed
        query_cos, query_sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if not plain:
            visible = (positions[None, :] <= positions[:, None])[None, None]  # [1, 1, L, L]
    else:
        rows = torch.arange(batch, device=hidden.device)
        residual, query_in = hidden[rows, read_at].unsqueeze(1), normed[rows, read_at].unsqueeze(1)
        query_cos, query_sin = cos[0, read_at][:, None, None], sin[0, read_at][:, None, None]
        visible = (positions[None, :] <= read_at[:, None])[:, None, None, :]  # [B, 1, 1, L]
    query = _rope(attn.q_proj(query_in).view(batch, query_in.shape[1], -1, head_dim).transpose(1, 2),
                  query_cos, query_sin)
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    own = (keys, values)
    if past is not None:
        keys = torch.cat([past[0].to(keys.dtype).expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([past[1].to(values.dtype).expand(batch, -1, -1, -1), values], dim=2)
        visible = torch.cat([visible.new_ones(*visible.shape[:-1], past[0].shape[2]), visible], dim=-1)
    groups = attn.num_key_value_groups
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, is_causal=plain,
                                              scale=attn.scaling)
    state = residual + attn.o_proj(attended.transpose(1, 2).reshape(batch, query_in.shape[1], -1))
    out = state + layer.mlp(layer.post_attention_layernorm(state))
    return (out if read_at is None else out.squeeze(1)), own


def decoder_states(decoder: LlamaModel, inputs_embeds: torch.Tensor, prefix_embeds: torch.Tensor | None = None,
                   read_at: torch.Tensor | None = None, output_layers: bool = False
                   ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Decoder states of the rows of `inputs_embeds` [B, L, H], which follow the prefix
    shared by every row (`prefix_embeds` [P, H], or none) and attend causally with no
    padding mask (as SeqRecommender feeds the decoder: padding is at the right, after every
    position read). Returns the post-norm states at every position [B, L, H], or with
    `read_at` only at position read_at[b] of each row [B, H]; and with `output_layers` every
    layer's output at every position (layers 1..k-1 as they leave the layer, layer k
    post-norm: transformers' `hidden_states[1:]`)."""
    if read_at is not None and output_layers:
        raise ValueError("output_layers needs every position; it cannot be combined with read_at")
    layers = decoder.layers[: decoder.config.num_hidden_layers]
    pasts: list[KeysValues | None] = [None] * len(layers)
    start = 0
    if prefix_embeds is not None and prefix_embeds.shape[0]:
        start = prefix_embeds.shape[0]
        hidden = prefix_embeds.unsqueeze(0)
        positions = torch.arange(start, device=hidden.device).unsqueeze(0)
        cos, sin = decoder.rotary_emb(hidden, position_ids=positions)
        for i, layer in enumerate(layers[:-1]):
            hidden, pasts[i] = _layer(layer, hidden, cos, sin, None)
        pasts[-1] = _keys_values(layers[-1], hidden, cos, sin)
    positions = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
    cos, sin = decoder.rotary_emb(inputs_embeds, position_ids=positions)
    hidden = inputs_embeds
    outputs = [] if output_layers else None  # kept only when asked: ranking needs none of them
    for layer, past in zip(layers[:-1], pasts[:-1]):
        hidden, _ = _layer(layer, hidden, cos, sin, past)
        if outputs is not None:
            outputs.append(hidden)
    last, _ = _layer(layers[-1], hidden, cos, sin, pasts[-1], read_at=read_at)
    last = decoder.norm(last)
    return last, (outputs + [last] if outputs is not None else None)
