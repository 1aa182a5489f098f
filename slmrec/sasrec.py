"""SASRec (Kang & McAuley, 2018): stage 0, which learns the item table the LLM stages freeze.

A small causal transformer over item embeddings plus learned positions, trained with
full-softmax cross-entropy against its own item embedding. Only `item_table()` leaves this
stage. Logits are dot products (the paper) or, with a `cosine_temperature`, cosine
similarities divided by it (unit-length user states and item rows, as generative-recommenders
trains its SASRec); the exported table then holds the unit rows the model scored against.
Blocks are pre-norm (attention and feed-forward each on a LayerNorm of the residual
stream), with padded positions zeroed after every block as in the original, so padding
never leaks into the residual stream; inputs follow the project's layout (0 = padding,
right-padded), and causal attention keeps later padding out of valid positions.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slmrec.checkpoint import load_checkpoint, save_checkpoint
from slmrec.scoring import item_scores, score_items

CHECKPOINT_FORMAT = "slmrec.SASRec/1"


class SASRecBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        attended, _ = self.attn(q, q, q, attn_mask=causal, need_weights=False)
        x = x + attended
        return x + self.ffn(self.ffn_norm(x))


class SASRec(nn.Module):
    def __init__(self, num_items: int, dim: int = 128, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.5, max_len: int = 50, cosine_temperature: float = 0.0):
        super().__init__()
        if num_items < 1 or dim < 1 or blocks < 1 or heads < 1 or max_len < 1:
            raise ValueError("SASRec needs num_items, dim, blocks, heads, max_len >= 1")
        if cosine_temperature < 0:
            raise ValueError(f"cosine_temperature must be >= 0 (0: dot products), got {cosine_temperature}")
        if dim % heads:
            raise ValueError(f"SASRec dim {dim} is not divisible by heads {heads}")
        self.hparams = {"num_items": num_items, "dim": dim, "blocks": blocks, "heads": heads,
                        "dropout": dropout, "max_len": max_len, "cosine_temperature": cosine_temperature}
        self.num_items, self.dim, self.max_len = num_items, dim, max_len
        self.cosine_temperature = cosine_temperature
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        # Unit-scale inputs after the sqrt(dim) scaling below.
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(dim, eps=1e-8)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items [B, L] (right-padded with 0) -> hidden [B, L, dim]; padded positions are 0."""
        if items.dim() != 2:
            raise ValueError(f"items must be [batch, length], got shape {tuple(items.shape)}")
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        if items.numel() and (items.min() < 0 or items.max() > self.num_items):
            raise ValueError(f"item ids must be in 0..{self.num_items} (0 = padding)")
        keep = (items != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        positions = torch.arange(length, device=items.device)
        x = self.item_emb(items) * math.sqrt(self.dim) + self.pos_emb(positions)
        x = self.emb_dropout(x) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1)
        for block in self.blocks:
            x = block(x, causal) * keep
        return self.final_norm(x) * keep

    def _output_table(self) -> torch.Tensor:
        # Looked up through the embedding's forward rather than read off `.weight`: ZeRO-3
        # only gathers a partitioned weight while its own module runs.
        table = self.item_emb(torch.arange(self.num_items + 1, device=self.pos_emb.weight.device))
        return F.normalize(table, dim=-1) if self.cosine_temperature else table

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., N+1] against the item embedding, column 0 = -inf."""
        return score_items(self._output_states(h), self._output_table())

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., N] scores of items 1..N (column j = item j+1): the training
        losses' layout."""
        return item_scores(self._output_states(h), self._output_table())

    def _output_states(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) / self.cosine_temperature if self.cosine_temperature else h

    def item_table(self) -> torch.Tensor:
        """The item rows the logits score against [N+1, dim] (unit rows under cosine
        similarity), detached, row 0 (padding) zero. Ranking a user state against it
        ranks as `logits` does: a positive scale per user changes no order."""
        table = self._output_table().detach().clone()
        table[0] = 0
        return table

    def save(self, directory: str | Path) -> None:
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_checkpoint(directory, tensors, {"format": CHECKPOINT_FORMAT, "config": self.hparams})

    @classmethod
    def load(cls, directory: str | Path) -> "SASRec":
        tensors, meta = load_checkpoint(directory)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{directory}: not a SASRec checkpoint (format {meta.get('format')!r})")
        model = cls(**meta["config"])
        model.load_state_dict(tensors, strict=True)
        return model
