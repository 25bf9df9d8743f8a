"""GPT architecture config (``configs/models/*.yaml``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from .loader import field_error, from_dict, load_yaml, resolve_config_path, to_dict


@dataclass
class ModelConfig:
    name: str  # a label for logs and checkpoints (default: the YAML file's or HF directory's name)
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int  # the MLP's inner width (per branch for swiglu)
    # Real tokenizer vocabulary. The embedding/output tables are padded to a multiple of
    # `make_vocab_size_divisible_by * tp` (see `padded_vocab_size`); padded ids never carry
    # probability mass (losses mask them) and checkpoints store only the real rows.
    vocab_size: int
    max_seq_length: int  # the longest window the model takes (learned positions: the table's size)
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    kv_channels: Optional[int] = None  # head dim; None = hidden_size / num_attention_heads
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # of the layers' inputs and the final output
    norm_epsilon: float = 1e-5
    # "gelu" is the exact (erf) GELU; "gelu_tanh" its tanh approximation (GPT-2's "gelu_new").
    activation: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    position_embedding: Literal["rope", "learned"] = "rope"  # rotary, or a learned table (GPT-2)
    rope_theta: float = 10000.0  # rotary base frequency
    rope_scaling_factor: Optional[float] = None  # Llama-3 style frequency scaling when set
    tie_embeddings: bool = False  # the output layer shares the input embedding's weights
    add_bias_linear: bool = False  # biases on every linear layer (GPT-2)
    add_qkv_bias: bool = False  # bias on the QKV projection only (Qwen2)
    # RMSNorm/LayerNorm over each head's query and key (weights of size kv_channels, shared by the
    # heads), before the rotary embedding (Qwen3).
    qk_layernorm: bool = False
    # Training-only (TRAINING_ONLY_FIELDS: a checkpoint loads into a model that differs in them):
    init_std: float = 0.02  # std of the random initial weights
    hidden_dropout: float = 0.0  # dropout of the embeddings and of the attention and MLP outputs
    attention_dropout: float = 0.0  # dropout of the attention probabilities

    def check(self, where: str = "") -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "max_seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                raise field_error(where, name, f"must be positive, got {getattr(self, name)}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups:
            raise field_error(where, "num_query_groups",
                              f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise field_error(where, "hidden_size",
                                  f"{self.hidden_size} not divisible by num_attention_heads={self.num_attention_heads}"
                                  " (set kv_channels explicitly)")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.kv_channels < 1:
            raise field_error(where, "kv_channels", f"must be >= 1, got {self.kv_channels}")
        if self.position_embedding == "rope" and self.kv_channels % 2:
            raise field_error(where, "kv_channels", f"rotary embeddings rotate pairs of channels: the head size "
                              f"must be even, got {self.kv_channels}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise field_error(where, name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.init_std <= 0:
            raise field_error(where, "init_std", f"must be positive, got {self.init_std}")
        if self.rope_scaling_factor is not None and self.position_embedding != "rope":
            raise field_error(where, "rope_scaling_factor", "only valid with position_embedding: rope")
        for name in ("rope_theta", "rope_scaling_factor"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise field_error(where, name, f"must be a positive number, got {value}")
        if not (math.isfinite(self.norm_epsilon) and self.norm_epsilon >= 0):
            raise field_error(where, "norm_epsilon", f"must be >= 0, got {self.norm_epsilon}")

    # ---- derived quantities -------------------------------------------------------------------
    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_layout(self, tp: int, pp: int, where: str = "parallel") -> None:
        """Raise ValueError if this model cannot be split ``tp`` ways (horizontally) and ``pp``
        ways (vertically)."""
        if self.num_attention_heads % tp:
            raise field_error(where, "tp", f"{tp} does not divide num_attention_heads={self.num_attention_heads}"
                              f" of model {self.name!r}")
        if self.num_query_groups % tp:
            raise field_error(where, "tp", f"{tp} does not divide num_query_groups={self.num_query_groups}"
                              f" of model {self.name!r}")
        if self.ffn_hidden_size % tp:
            raise field_error(where, "tp", f"{tp} does not divide ffn_hidden_size={self.ffn_hidden_size}"
                              f" of model {self.name!r}")
        if self.num_layers % pp:
            raise field_error(where, "pp", f"{pp} does not divide num_layers={self.num_layers} of model {self.name!r}")

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of the unpartitioned model (real vocab, no padding)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.kv_channels
        kv = 2 * self.num_query_groups * self.kv_channels
        norm = h if self.normalization == "rmsnorm" else 2 * h
        bias = self.add_bias_linear
        per_layer = (
            norm  # input norm
            + h * (q + kv) + ((q + kv) if (bias or self.add_qkv_bias) else 0)  # qkv
            + (2 * norm // h * self.kv_channels if self.qk_layernorm else 0)  # query and key norms
            + q * h + (h if bias else 0)  # out proj
            + norm  # pre-mlp norm
            + (2 if self.activation == "swiglu" else 1) * h * f + ((2 if self.activation == "swiglu" else 1) * f if bias else 0)
            + f * h + (h if bias else 0)
        )
        total = self.num_layers * per_layer + norm
        if include_embedding:
            total += v * h
            if self.position_embedding == "learned":
                total += self.max_seq_length * h
        if not self.tie_embeddings:
            total += v * h
        return total

    def flops_per_token(self, seq_length: int, training: bool = True) -> float:
        """Model FLOPs per token (the MFU numerator; no recomputation counted).

        Forward = 2 * (matmul parameters incl. the output layer, excl. the embedding lookup)
        + attention scores and values, 2 * 2 * L * S * (heads * head_dim) for the full S x S
        matrix (causal masking is not credited, as in PaLM/Megatron-LM MFU). Training = 3 x forward.
        """
        h = self.hidden_size
        q = self.num_attention_heads * self.kv_channels
        kv = 2 * self.num_query_groups * self.kv_channels
        n_mlp = 3 if self.activation == "swiglu" else 2
        matmul_params = self.num_layers * (h * (q + kv) + q * h + n_mlp * h * self.ffn_hidden_size)
        matmul_params += self.vocab_size * h  # output layer
        attention = 2 * 2 * self.num_layers * seq_length * q
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward


# Fields that leave a model's weights and forward pass as they are: stored weights load into a
# model that differs in them (dropout is a training choice; init_std is overwritten by the load;
# the loaders pad or trim the vocabulary to any multiple; the name is a label).
TRAINING_ONLY_FIELDS = ("name", "init_std", "hidden_dropout", "attention_dropout", "make_vocab_size_divisible_by")


def weight_differences(stored: dict, model: ModelConfig, free: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``model`` whose value in ``stored`` (a model config as a dict) would change
    its weights, besides ``free``: all but the training-only ones and, with rotary positions
    (no position table), ``max_seq_length``, the run's choice."""
    free = TRAINING_ONLY_FIELDS + tuple(free)
    if model.position_embedding == "rope" and stored.get("position_embedding", "rope") == "rope":
        free += ("max_seq_length",)
    ours = to_dict(model)
    return sorted(k for k in set(ours) | set(stored) if k not in free and stored.get(k) != ours.get(k))


def _from_hf(path: str, where: str) -> ModelConfig:
    from ..convert.hf_config import model_config_from_hf  # convert imports config
    from ..convert.hf_weights import read_hf_config

    try:
        return model_config_from_hf(read_hf_config(path), Path(path).resolve().name, str(Path(path) / "config.json"))[0]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_model_config(ref, where: str = "model") -> ModelConfig:
    """A model config from a name (``configs/models/<name>.yaml``), a YAML path, a Hugging Face
    model directory (its ``config.json``), or a mapping. A mapping with ``hf: DIR`` starts from that
    directory's config and sets its other keys on it (``{hf: /models/Qwen2.5-7B, vocab_size:
    151665}``: the tokenizer's ids instead of the padded table; command-line overrides such as
    ``teacher.model.vocab_size=151665`` on a directory reference produce it)."""
    if isinstance(ref, ModelConfig):
        return ref
    if isinstance(ref, str) and (Path(ref) / "config.json").is_file():
        return _from_hf(ref, where)
    if isinstance(ref, dict) and "hf" in ref:
        base = to_dict(_from_hf(str(ref["hf"]), f"{where}.hf"))
        base.update({k: v for k, v in ref.items() if k != "hf"})
        return from_dict(ModelConfig, base, where)
    if isinstance(ref, str):
        path = resolve_config_path(ref, "models")
        raw = load_yaml(path)
        raw.setdefault("name", path.stem)
        try:
            return from_dict(ModelConfig, raw, where)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if isinstance(ref, dict):
        ref = dict(ref)
        ref.setdefault("name", "custom")
        return from_dict(ModelConfig, ref, where)
    raise ValueError(f"{where}: expected a model name, a YAML path or a mapping, got {ref!r}")
