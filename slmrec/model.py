"""The sequential recommender: one class for the teacher and the student.

    items [B, L] --frozen item table--> [B, L, item_dim] --input_proj--> [B, L, H]
      (optional instruction prompt's token embeddings prepended)
    --decoder (HF base model, k layers)--> final post-norm states [B, L, H]
    --score--> [B, L, item_dim] --dot item table--> logits [B, L, N+1]

Conventions: item 0 is padding, real items are 1..N; sequences are right-padded with 0 and
`mask = items != 0`; logit column 0 is -inf so padding is never predicted or ranked.

Every position is trained causally in one pass: the state at item position t is the user
representation after items 1..t. That is why the prompt has no response-marker suffix (the
paper's template ends with one): each item position already ends its own prefix, and a
marker after the last item would serve only one of the L targets. With right padding the
prompt, then the valid items, occupy positions 0..P+n-1 with no gaps, so no attention mask
is needed: causal attention already keeps padding (which comes later) out of every valid
position. On LLaMA-architecture backbones the prompt, the same for every user, runs once per
batch (slmrec.llama_forward).

A student is the same config with fewer backbone layers (fresh weights by default;
`init_from_teacher` is an option the distillation job measures).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmrec.backbones import BackboneConfig, apply_finetuning, decoder_from_config, load_backbone, merge_lora
from slmrec.checkpoint import load_checkpoint, save_checkpoint
from slmrec.config import field
from slmrec.scoring import item_scores, score_items

PROMPT = "Given the user's interaction history, predict the next item. History:"
CHECKPOINT_FORMAT = "slmrec.SeqRecommender/1"


@dataclasses.dataclass
class RecommenderConfig:
    num_items: int = field(help="number of real items N (ids 1..N; 0 is padding)")
    item_dim: int = field(128, help="width of the frozen item table")
    backbone: BackboneConfig = field(default_factory=BackboneConfig, help="decoder backbone")
    aux_heads: int = field(0, help="extra score heads for multiple supervision (distillation)")
    prompt: bool = field(True, help="prepend the instruction prompt when the backbone has a tokenizer")
    max_len: int = field(50, help="longest item sequence accepted")
    vocabulary: str = field("", help="digest of the training data's item ids in index order "
                                     "(pipelines.prepared.vocabulary_digest); empty: not recorded")

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.aux_heads < 0:
            raise ValueError(f"aux_heads must be >= 0, got {self.aux_heads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def last_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of each right-padded row's last valid position [B] from its mask [B, L]."""
    lengths = mask.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("a sequence has no valid item (all padding); cannot take its last position")
    return lengths - 1


@dataclasses.dataclass
class RecOutput:
    """`hidden`: final post-norm states at the item positions [B, L, H]; `mask`: valid
    item positions [B, L]; `layers` (only with output_layers=True): one [B, L, H] per kept
    decoder layer, layers[d-1] = residual stream after layer d, except the last entry,
    which is post-norm (the same tensor as `hidden`)."""
    hidden: torch.Tensor
    mask: torch.Tensor
    layers: list[torch.Tensor] | None = None


class SeqRecommender(nn.Module):
    def __init__(self, config: RecommenderConfig, decoder: nn.Module, item_table: torch.Tensor,
                 prompt_ids: list[int] | None = None, full_depth: int | None = None):
        super().__init__()
        expected = (config.num_items + 1, config.item_dim)
        if tuple(item_table.shape) != expected:
            raise ValueError(f"item table has shape {tuple(item_table.shape)}, expected {expected} "
                             f"(num_items + 1 rows, row 0 = padding)")
        self.config = config
        self.decoder = decoder
        hidden = decoder.config.hidden_size
        # A buffer, not a parameter: saved with the model, invisible to optimisers (and to
        # ZeRO partitioning), so stage 0's table stays exactly as exported.
        self.register_buffer("item_table", item_table.detach().clone().float())
        self.input_proj = nn.Linear(config.item_dim, hidden, bias=True)
        self.score = nn.Linear(hidden, config.item_dim, bias=False)
        self.aux_heads = nn.ModuleList(
            nn.Linear(hidden, config.item_dim, bias=False) for _ in range(config.aux_heads))
        self.prompt_ids = list(prompt_ids) if prompt_ids else []
        self.register_buffer("_prompt_ids", torch.tensor(self.prompt_ids, dtype=torch.long),
                             persistent=False)
        self.full_depth = full_depth or self.depth

    @property
    def depth(self) -> int:
        return self.decoder.config.num_hidden_layers

    def _item_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """The items' decoder inputs [B, L, H]."""
        # The table is a buffer, which DeepSpeed's bf16 keeps in fp32 while it casts weights.
        # An int8 copy's projection holds no parameters (packed weights) and takes fp32.
        weight = next(self.input_proj.parameters(), None)
        rows = F.embedding(items, self.item_table)
        x = self.input_proj(rows if weight is None else rows.to(weight.dtype))
        return x.to(self.decoder.get_input_embeddings().weight.dtype)

    def _prompt_inputs(self) -> torch.Tensor:
        """The prompt's token embeddings [P, H] (P = 0 without a prompt)."""
        return self.decoder.get_input_embeddings()(self._prompt_ids)

    def _decoder_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [B, P + L, H]: the prompt's token embeddings, then the items'."""
        x = self._item_inputs(items)
        if self.prompt_ids:
            x = torch.cat([self._prompt_inputs().to(x.dtype).expand(items.shape[0], -1, -1), x], dim=1)
        return x

    def forward(self, items: torch.Tensor, output_layers: bool = False) -> RecOutput:
        """Post-norm states at every position (and with `output_layers` every layer's
        output), the prompt's positions left out."""
        # Lazy like every transformers import here: a built model has loaded it already.
        from slmrec.llama_forward import decoder_states, supported

        if not supported(self.decoder):
            return self.hf_forward(items, output_layers)
        mask = self._check_items(items)
        hidden, layers = decoder_states(self.decoder, self._item_inputs(items), self._prompt_inputs(),
                                        output_layers=output_layers)
        return RecOutput(hidden=hidden, mask=mask, layers=layers)

    def hf_forward(self, items: torch.Tensor, output_layers: bool = False) -> RecOutput:
        """`forward` through transformers' own decoder forward, the prompt run for every row:
        the path for any architecture, and the reference the LLaMA path is tested against."""
        mask = self._check_items(items)
        out = self.decoder(inputs_embeds=self._decoder_inputs(items),
                           output_hidden_states=output_layers, use_cache=False)
        prompt_len = len(self.prompt_ids)
        hidden = out.last_hidden_state[:, prompt_len:]
        layers = None
        if output_layers:
            # transformers 5 returns (embeddings, layer 1, ..., layer k) with the last entry
            # replaced by the post-norm output.
            layers = [h[:, prompt_len:] for h in out.hidden_states[1:]]
        return RecOutput(hidden=hidden, mask=mask, layers=layers)

    def user_states(self, items: torch.Tensor) -> torch.Tensor:
        """Post-norm states at each row's last item [B, H]: `last_position(forward(items))`,
        computed where the backbone allows it with the last layer only there, since ranking
        reads nothing else (slmrec.llama_forward)."""
        from slmrec.llama_forward import decoder_states, supported

        if not supported(self.decoder):
            out = self(items)
            return self.last_position(out.hidden, out.mask)
        return decoder_states(self.decoder, self._item_inputs(items), self._prompt_inputs(),
                              read_at=last_indices(self._check_items(items)))[0]

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Users in item space [B, item_dim], to rank against the item table."""
        return self.project(self.user_states(items))

    def _check_items(self, items: torch.Tensor) -> torch.Tensor:
        if items.dim() != 2 or items.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"items must be an integer tensor [batch, length], got "
                             f"{items.dtype} of shape {tuple(items.shape)}")
        if items.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {items.shape[1]} exceeds max_len {self.config.max_len}")
        if items.numel() and (items.min() < 0 or items.max() > self.config.num_items):
            raise ValueError(f"item ids must be in 0..{self.config.num_items} (0 = padding), got "
                             f"{int(items.min())}..{int(items.max())}")
        mask = items != 0
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("items must be right-padded: a real item follows padding (0)")
        return mask

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """User states into item space [..., item_dim]; rank items by project(h) @ table.T
        (in chunks of the table for large catalogues)."""
        return self.score(h.to(self.score.weight.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores over all items [..., N+1], column 0 (padding) = -inf."""
        return score_items(self.project(h), self.item_table)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of items 1..N [..., N] (column j = item j+1): the training losses' layout."""
        return item_scores(self.project(h), self.item_table)

    def aux_item_logits(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Scores from multiple-supervision head `i` (same layout as `item_logits`)."""
        head = self.aux_heads[i]
        return item_scores(head(h.to(head.weight.dtype)), self.item_table)

    @staticmethod
    def last_position(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x[b, last valid position of row b] for right-padded rows: [B, L, ...] -> [B, ...]."""
        index = last_indices(mask).view(-1, *([1] * (x.dim() - 1))).expand(-1, 1, *x.shape[2:])
        return x.gather(1, index).squeeze(1)

    def parameter_counts(self) -> dict[str, int]:
        """total: every weight the model holds, frozen ones and the item table included;
        trainable: what the optimiser updates; item_table and token_embeddings (the
        backbone's vocabulary table, used only for the prompt) broken out because they
        are the same size in teacher and student."""
        params = list(self.parameters())
        return {
            "total": sum(p.numel() for p in params) + self.item_table.numel(),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "item_table": self.item_table.numel(),
            "token_embeddings": self.decoder.get_input_embeddings().weight.numel(),
        }

    def save(self, directory: str | Path) -> None:
        """Weights (safetensors) + config (JSON). The whole state is saved, LoRA adapters
        unmerged next to their frozen base weights, so a loaded model trains on exactly as
        before; the backbone's own (truncated) config is stored, so loading needs neither
        the source checkpoint nor a tokenizer nor network."""
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "backbone_config": self.decoder.config.to_dict(),
            "prompt_ids": self.prompt_ids,
            "full_depth": self.full_depth,
        }
        save_checkpoint(directory, tensors, meta)

    @classmethod
    def load(cls, directory: str | Path) -> "SeqRecommender":
        tensors, meta = load_checkpoint(directory)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{directory}: not a SeqRecommender checkpoint "
                             f"(format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
        config = RecommenderConfig(**meta["config"])
        decoder = decoder_from_config(meta["backbone_config"], config.backbone.dtype)
        decoder = apply_finetuning(decoder, config.backbone)
        model = cls(config, decoder, tensors["item_table"], meta["prompt_ids"], meta["full_depth"])
        model.load_state_dict(tensors, strict=True)
        return model


def build_recommender(config: RecommenderConfig, item_table: torch.Tensor, seed: int = 0) -> SeqRecommender:
    """A fresh recommender: backbone loaded/built per `config.backbone`, projections and
    heads (and a scratch backbone, and LoRA adapters) initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder, tokenizer, full_depth = load_backbone(config.backbone)
        prompt_ids = None
        if config.prompt and tokenizer is not None:
            prompt_ids = tokenizer(PROMPT)["input_ids"]
        return SeqRecommender(config, decoder, item_table, prompt_ids, full_depth)


def init_from_teacher(student: SeqRecommender, teacher: SeqRecommender) -> None:
    """Copy into `student` every teacher weight it has a place for: projections, score,
    prompt embeddings, final norm and the teacher's FIRST `student.depth` layers (LoRA
    adapters included, or merged into the weights when the student has none).
    Auxiliary heads the teacher lacks stay fresh. Raises if any other weight has no
    same-shaped teacher counterpart."""
    if student.depth > teacher.depth:
        raise ValueError(f"student has {student.depth} layers, teacher only {teacher.depth}")
    if student.prompt_ids != teacher.prompt_ids:
        raise ValueError("student and teacher use different prompts; build both from the same "
                         "backbone with the same prompt setting")
    if teacher.config.backbone.use_lora and not student.config.backbone.use_lora:
        merged = copy.deepcopy(teacher)
        merge_lora(merged)  # plain Linear layers again, under the names the student uses
        source = merged.state_dict()
    else:
        source = teacher.state_dict()
    copied = {}
    for name, value in student.state_dict().items():
        if name in source and source[name].shape == value.shape:
            copied[name] = source[name]
        elif not name.startswith("aux_heads."):
            raise ValueError(f"cannot initialise student weight {name!r} from the teacher "
                             f"(missing or shaped differently there)")
    student.load_state_dict(copied, strict=False)
