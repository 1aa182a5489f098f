"""Layer-redundancy probe: how good is the representation after each decoder layer?

The paper's central finding is that most of an LLM's layers are redundant for next-item
prediction: a recommender read out after a few layers is about as good as one read out
after all of them. The probe measures that for one frozen model:

1. one backbone forward per batch yields the states after EVERY decoder layer at once;
2. each layer d gets its own linear readout (hidden -> item_dim, no bias, like the
   model's `score` head) scored against the frozen item table with full-softmax
   cross-entropy at the last `positions_per_user` valid positions of each training
   sequence (causal, as in training). All readouts train side by side on the same
   batches with Adam; the backbone, `input_proj` and the item table stay frozen, so each
   training batch goes through the backbone ONCE and its states are reused on every pass
   (a deep backbone's forward would otherwise dominate the probe's cost many times over);
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

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slmrec.backbones import kept_layer_indices
from slmrec.checkpoint import atomic_save_figure
from slmrec.evaluation import EvalProtocol, ranks_from_vectors
from slmrec.losses import next_item_ce
from slmrec.metrics import MetricSums
from slmrec.model import SeqRecommender
from slmrec.scoring import item_scores

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


def last_positions(targets: torch.Tensor, per_user: int) -> torch.Tensor:
    """Mask of the last `per_user` positions with a target (non-zero) in each row."""
    has_target = targets != 0
    from_end = has_target.flip(1).cumsum(1).flip(1)
    return has_target & (from_end <= per_user)


def _frozen_states(model: SeqRecommender, items: torch.Tensor, include_input: bool, autocast: bool
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`layer_states` of the frozen model, its forward optionally under bf16 autocast (the
    states come back fp32, so the readouts train and rank in fp32 either way)."""
    with torch.no_grad(), torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=autocast):
        return layer_states(model, items, include_input)


def _frozen_features(model: SeqRecommender, train_batches: Iterable[Mapping[str, Any]], device: torch.device,
                     include_input: bool, per_user: int, autocast: bool
                     ) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """(per-layer states at the kept positions, their targets) for every training batch."""
    features = []
    for batch in train_batches:
        items, targets = _as_tensors(batch, device, "train")
        keep = last_positions(targets, per_user)
        states, _ = _frozen_states(model, items, include_input, autocast)
        features.append(([state[keep] for state in states], targets[keep]))
    if not features:
        raise ValueError("train_batches held no batch; nothing to fit the probe's readouts on")
    return features


def probe_layers(model: SeqRecommender, train_batches: Iterable[Mapping[str, Any]],
                 valid_batches: Iterable[Mapping[str, Any]], steps: int = 300, lr: float = 3e-3,
                 seed: int = 0, protocol: EvalProtocol = EvalProtocol(),
                 include_input: bool = False, positions_per_user: int = 16,
                 autocast: bool = False) -> list[dict[str, Any]]:
    """Fit one linear readout per layer on `train_batches` and rank `valid_batches` with it.

    train batches: {"items": [B, L], "targets": [B, L] (0 = no target)}; validation
    batches: {"items": [B, L], "targets": [B]} (slmrec.batching.to_arrays layouts; numpy
    arrays or tensors). One optimiser step per training batch, `steps` in all (the
    batches are passed over again if needed; their states are kept in memory, about
    batches x B x positions_per_user x depth x hidden floats, so pass a bounded sample). Returns one row per layer, shallow to deep:
    {"layer": d, "source_layer": index in the full backbone (differs from d under
    interval truncation), "protocol": label, "train_ce": mean readout CE over the last
    steps, then every metric of slmrec.metrics (HR@1/5/10, NDCG@5/10, MRR)}.
    `include_input` adds a layer-0 row (see `layer_states`). `autocast` runs the frozen
    model's forwards (most of the probe's cost for a deep backbone) under bf16 autocast.
    """
    if steps < 1 or positions_per_user < 1:
        raise ValueError(f"steps and positions_per_user must be >= 1, got {steps} and {positions_per_user}")
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
        features = _frozen_features(model, train_batches, device, include_input, positions_per_user, autocast)
        for step in range(steps):
            states, targets = features[step % len(features)]
            optimizer.zero_grad(set_to_none=True)
            # One backward per layer: the readouts are independent, and holding every
            # layer's [positions, items] logits at once would multiply peak memory by depth.
            for readout, state, history in zip(readouts, states, recent):
                loss = next_item_ce(item_scores(readout(state), table), targets)
                loss.backward()
                history[:] = (history + [loss.item()])[-_TRAIN_CE_WINDOW:]
            optimizer.step()

        sums = [MetricSums() for _ in layer_ids]
        with torch.no_grad():
            for batch in valid_batches:
                items, targets = _as_tensors(batch, device, "valid")
                states, mask = _frozen_states(model, items, include_input, autocast)
                for readout, state, layer_sums in zip(readouts, states, sums):
                    vectors = readout(SeqRecommender.last_position(state, mask))
                    layer_sums.add(ranks_from_vectors(vectors.float(), table, items, targets, protocol,
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
