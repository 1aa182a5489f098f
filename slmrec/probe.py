"""Layer-redundancy probe: how good is the representation after each decoder layer?

The paper's central finding is that most of an LLM's layers are redundant for next-item
prediction: a recommender read out after a few layers is about as good as one read out
after all of them. The probe measures that for one frozen model:

1. one backbone forward per batch yields the states after EVERY decoder layer at once;
2. each layer d gets its own linear readout (hidden -> item_dim, no bias, like the
   model's `score` head) scored against the frozen item table with full-softmax
   cross-entropy at every valid position (causal, as in training). All readouts train
   side by side on the same batches with Adam; the backbone, `input_proj` and the item
   table stay frozen;
3. each readout is evaluated on validation users (last position, full ranking by
   default, via slmrec.evaluation), giving NDCG@10 and friends per layer.

Which state is read at layer d: the backbone's FINAL NORM applied to the residual stream
after layer d, i.e. the state the model would emit if it were truncated to d layers. The
last layer's output (`RecOutput.layers[-1]`) is already post-norm and is used as it is.
Reading the raw residual stream instead would compare unlike things: its scale grows
with depth and pretrained LMs carry a few huge-magnitude channels there, so a linear
readout on it is both harder to fit in a few hundred steps and not what any truncated
model would see. (Distillation aligns raw residual streams; the probe is a different
question.)

The readouts are fresh (seeded), not the model's own `score` head, so every layer is
read the same way; the last layer's probe therefore need not equal the model's own
metrics. An untrained model (e.g. the full 30-layer pretrained backbone with a fresh
`input_proj`) can be probed too: then the question is how much a frozen pretrained LM
adds, layer by layer, to randomly projected item embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slmrec.backbones import kept_layer_indices
from slmrec.checkpoint import atomic_save_figure
from slmrec.evaluation import EvalProtocol, batch_ranks
from slmrec.losses import next_item_ce
from slmrec.metrics import MetricSums
from slmrec.model import SeqRecommender
from slmrec.scoring import score_items

# Names the final norm goes by in Hugging Face decoders (LLaMA/Qwen/Mistral, Phi, GPT-2).
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f")
# The reported training CE is the mean over this many final steps (one step is noisy).
_TRAIN_CE_WINDOW = 10


def final_norm(decoder: nn.Module) -> nn.Module:
    """The decoder's final normalisation module (applied after its last layer)."""
    for name in _FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the final norm of {type(decoder).__name__} "
                     f"(looked for attributes {list(_FINAL_NORM_NAMES)})")


def layer_states(model: SeqRecommender, items: torch.Tensor, include_input: bool = False
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([final_norm(residual after layer d) for d = 1..depth], valid mask), one forward.

    Each state is float32 [B, L, H]. With `include_input`, a "layer 0" state comes first:
    the projected item embedding alone (the input to the first layer), a floor that shows
    what the layers add.
    """
    out = model(items, output_layers=True)
    norm = final_norm(model.decoder)
    states = [norm(h) for h in out.layers[:-1]] + [out.layers[-1]]
    if include_input:
        embedded = model.input_proj(F.embedding(items, model.item_table))
        states.insert(0, norm(embedded.to(out.layers[0].dtype)))
    return [s.float() for s in states], out.mask


@dataclass
class _FixedVectors:
    """A Ranker over user vectors already computed (so one forward serves every layer)."""

    vectors: torch.Tensor
    table: torch.Tensor

    def user_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.vectors

    def item_table(self) -> torch.Tensor:
        return self.table


def _as_tensors(batch: Mapping[str, Any], device: torch.device, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "items" not in batch or "targets" not in batch:
        raise ValueError(f"{split} batch needs 'items' and 'targets', got keys {sorted(batch)}")
    items = torch.as_tensor(batch["items"], dtype=torch.long, device=device)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long, device=device)
    want = items.shape if split == "train" else items.shape[:1]
    if targets.shape != want:
        raise ValueError(f"{split} targets must have shape {tuple(want)} for items {tuple(items.shape)} "
                         f"({'one target per position' if split == 'train' else 'one target per user'}), "
                         f"got {tuple(targets.shape)}")
    return items, targets


def _repeat(batches: Iterable[Mapping[str, Any]], steps: int) -> Iterator[Mapping[str, Any]]:
    """`steps` batches, passing over `batches` again as often as needed."""
    done = 0
    while True:
        passed = 0
        for batch in batches:
            yield batch
            done += 1
            passed += 1
            if done == steps:
                return
        if passed == 0:
            raise ValueError(f"train_batches ran out after {done} batches but steps={steps}; pass a "
                             "re-iterable collection (e.g. a list) or fewer steps")


def probe_layers(model: SeqRecommender, train_batches: Iterable[Mapping[str, Any]],
                 valid_batches: Iterable[Mapping[str, Any]], steps: int = 300, lr: float = 3e-3,
                 seed: int = 0, protocol: EvalProtocol = EvalProtocol(),
                 include_input: bool = False) -> list[dict[str, Any]]:
    """Fit one linear readout per layer on `train_batches` and rank `valid_batches` with it.

    train batches: {"items": [B, L], "targets": [B, L] (0 = no target)}; validation
    batches: {"items": [B, L], "targets": [B]} (slmrec.batching.to_arrays layouts; numpy
    arrays or tensors). One optimiser step per training batch, `steps` in all (the
    batches are passed over again if needed). Returns one row per layer, shallow to deep:
    {"layer": d, "source_layer": index in the full backbone (differs from d under
    interval truncation), "protocol": label, "train_ce": mean readout CE over the last
    steps, then every metric of slmrec.metrics (HR@1/5/10, NDCG@5/10, MRR)}.
    `include_input` adds a layer-0 row (see `layer_states`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = model.item_table.device
    table = model.item_table.float()
    sources = [i + 1 for i in kept_layer_indices(model.full_depth, model.depth,
                                                  model.config.backbone.truncation)]
    layer_ids = ([0] if include_input else []) + list(range(1, model.depth + 1))
    source_ids = ([0] if include_input else []) + sources
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        readouts = nn.ModuleList(
            nn.Linear(model.decoder.config.hidden_size, model.config.item_dim, bias=False)
            for _ in layer_ids).to(device)
    optimizer = torch.optim.Adam(readouts.parameters(), lr=lr)
    recent: list[list[float]] = [[] for _ in layer_ids]

    was_training = model.training
    model.eval()
    try:
        for batch in _repeat(train_batches, steps):
            items, targets = _as_tensors(batch, device, "train")
            keep = targets != 0
            with torch.no_grad():
                states, _ = layer_states(model, items, include_input)
            optimizer.zero_grad(set_to_none=True)
            # One backward per layer: the readouts are independent, and holding every
            # layer's [positions, items] logits at once would multiply peak memory by depth.
            for readout, state, history in zip(readouts, states, recent):
                loss = next_item_ce(score_items(readout(state[keep]), table), targets[keep])
                loss.backward()
                history[:] = (history + [loss.item()])[-_TRAIN_CE_WINDOW:]
            optimizer.step()

        sums = [MetricSums() for _ in layer_ids]
        with torch.no_grad():
            for batch in valid_batches:
                items, targets = _as_tensors(batch, device, "valid")
                states, mask = layer_states(model, items, include_input)
                for readout, state, layer_sums in zip(readouts, states, sums):
                    vectors = readout(SeqRecommender.last_position(state, mask))
                    layer_sums.add(batch_ranks(_FixedVectors(vectors, table), items, targets, protocol,
                                               batch.get("user_seed")))
    finally:
        model.train(was_training)

    if sums[0].count == 0:
        raise ValueError("valid_batches held no users; nothing to evaluate the probe on")
    return [{"layer": d, "source_layer": s, "protocol": protocol.label,
             "train_ce": sum(h) / len(h), **layer_sums.result()}
            for d, s, h, layer_sums in zip(layer_ids, source_ids, recent, sums)]


def plot_probe(results: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
               metric: str = "NDCG@10") -> Path:
    """A PNG of `metric` against layer, one line per model (e.g. {"teacher (8 layers)":
    rows, "full backbone (30 layers)": rows}, rows as `probe_layers` returns them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("plot_probe needs at least one model's probe rows")
    protocols = sorted({row.get("protocol", "?") for rows in results.values() for row in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results.items():
        missing = [row.get("layer") for row in rows if metric not in row]
        if not rows or missing:
            raise ValueError(f"probe rows of {name!r} lack {metric!r} (layers {missing}) or are empty")
        ax.plot([row["layer"] for row in rows], [row[metric] for row in rows], marker="o", label=name)
    ax.set(xlabel="decoder layer read out (0 = item embedding only)",
           ylabel=f"validation {metric} ({', '.join(protocols)})",
           title="Layer-redundancy probe: linear readout of each layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path)
    return path
