"""megatron-core ``GPTModel`` builder: model config + role groups + pipeline stage -> module."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ..config import ModelConfig
from ..parallel import RoleGroups
from .attention import SDPAttention
from .compile import check_compile_support, compile_layers
from .cuda_graphs import attach_layer_graphs, check_graph_support
from .documents import DocumentMask
from .init import init_parameters
from .layer import DirectTransformerLayer
from .params import ParamSpec, param_specs
from .rope import DeviceRotaryEmbedding


def transformer_engine_available(device: torch.device) -> bool:
    """TE is an optional accelerator: used on CUDA when importable, unless KDTRAIN_NO_TE=1."""
    return (device.type == "cuda" and os.environ.get("KDTRAIN_NO_TE") != "1"
            and importlib.util.find_spec("transformer_engine") is not None)


def transformer_engine_layers(cfg: ModelConfig, tp: int, device: torch.device, trains: bool = True) -> bool:
    """Whether ``build_gpt`` builds Transformer Engine layers by default: where TE is available,
    except for a model that trains with attention dropout on several tensor ranks. TE's attention
    draws its dropout from megatron-core's CUDA RNG tracker only when that global tracker is
    initialised; kdtrain does not initialise it (SDPAttention forks a generator per tensor rank
    instead, attention.py), so TE would draw from the stream the tensor ranks share and drop the
    same positions of head h on every rank. kdtrain's local layers draw them independently."""
    if not transformer_engine_available(device):
        return False
    return not (trains and tp > 1 and cfg.attention_dropout > 0.0)


_ACTIVATIONS = {
    "swiglu": F.silu,  # gated: silu(gate) * up
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def transformer_config(cfg: ModelConfig, tp: int, pp: int, dtype: torch.dtype,
                       device: torch.device) -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=_ACTIVATIONS[cfg.activation],
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias or cfg.add_bias_linear,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # kdtrain initialises weights itself (layout-independent, see init.py).
        perform_initialization=False,
        use_cpu_initialization=device.type == "cpu",
        # Fusions that need apex/TE kernels or the CUDA RNG tracker stay off; SDPA does attention.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )


def layer_spec(cfg: ModelConfig, use_te: bool) -> ModuleSpec:
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
                                    qk_layernorm=cfg.qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.module = DirectTransformerLayer  # same submodules and parameters, direct forward (layer.py)
    return spec


class KDGPTModel(GPTModel):
    """GPTModel whose last stage returns vocab-parallel logits ``[s, b, V/tp]`` as computed.

    The stock post-processing transposes and copies the logits to ``[b, s, V/tp]`` (or computes a
    cross entropy); the losses here work on the ``[s, b]`` token order, so that copy of the
    largest activation is skipped. With ``logit_rows`` only those rows of the ``[s * b]`` token
    order reach the output layer, ``[n, 1, V/tp]``: where only some labels are targets
    (conversations, sampled replies, padding), the output layer, the teacher's top-k and the
    student's loss skip the others.
    """

    param_specs: dict[str, ParamSpec]
    layer_offset: int
    _logit_rows: Optional[torch.Tensor] = None  # set for the duration of one forward

    def forward(self, input_ids, position_ids, attention_mask, *args, logit_rows: Optional[torch.Tensor] = None,
                **kwargs):
        """megatron-core's forward; ``attention_mask``: None (causal over the window) or a
        ``DocumentMask`` (attention within documents, documents.py), which only kdtrain's direct
        layers apply; ``logit_rows``: [n] int64 indices into the ``[s * b]`` token order, the only
        rows the last stage computes logits for (None: all)."""
        if isinstance(attention_mask, DocumentMask):
            self.require_direct_layers("data.attention: documents")
        self._logit_rows = logit_rows
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._logit_rows = None
            if isinstance(attention_mask, DocumentMask):
                attention_mask.release()

    def require_direct_layers(self, what: str) -> None:
        """ValueError naming ``what`` unless every layer of this stage runs kdtrain's direct forward."""
        stock = [layer.layer_number for layer in self.decoder.layers if not getattr(layer, "direct", False)]
        if stock:
            why = ("Transformer Engine layers: set KDTRAIN_NO_TE=1" if self.transformer_layer_spec.module
                   is not DirectTransformerLayer else "on megatron-core's stock forward (kdtrain/models/layer.py)")
            raise ValueError(f"{what} needs kdtrain's local layers, but layers {stock} are {why}")

    def _postprocess(self, hidden_states, **unused):
        if not self.post_process:
            return hidden_states
        if self._logit_rows is not None:  # [s, b, h] -> the rows' [n, 1, h]
            hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, self._logit_rows)
            hidden_states = hidden_states.unsqueeze(1)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight)
        return logits


def build_gpt(cfg: ModelConfig, groups: RoleGroups, *, device: torch.device, dtype: torch.dtype,
              seed: Optional[int], use_te: Optional[bool] = None, compile: bool = False,
              cuda_graphs: bool = False, recompute: bool = False) -> KDGPTModel:
    """This rank's pipeline stage of a GPT, initialised from ``seed`` (layout-independent), or
    left uninitialised with ``seed=None``, for a caller that loads every weight next (init
    draws each parameter's whole global tensor: for a large teacher, gigabytes and seconds of
    values the load replaces); ``compile``: torch.compile its transformer layers (see
    compile.py); ``cuda_graphs``: prepare
    them for replay as CUDA graphs (cuda_graphs.py; ``capture_layer_graphs`` captures);
    ``recompute``: its layers recompute their activations in the backward (layer.py);
    ``use_te``: Transformer Engine layers (None: ``transformer_engine_layers`` for a model that
    trains)."""
    layout = groups.layout
    cfg.check_layout(layout.tp, layout.pp, f"{layout.name}.parallel")
    if compile:
        check_compile_support(device)
    if use_te is None:
        use_te = transformer_engine_layers(cfg, layout.tp, device)
    if cuda_graphs:
        check_graph_support(layout, device, compile, use_te)
    tcfg = transformer_config(cfg, layout.tp, layout.pp, dtype, device)
    # megatron-core's tied-embedding set-up all-reduces the last stage's copy through
    # `weight.data.cuda()`; kdtrain's init writes identical values on both stages instead, so the
    # model gets no embedding group (gradient sync of the tied copies is kdtrain's, see grads.py).
    pgc = ProcessGroupCollection(**{k: v for k, v in vars(groups.pgc).items()})
    pgc.embd = None
    model = KDGPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(cfg, use_te),
        vocab_size=cfg.padded_vocab_size(layout.tp),
        max_sequence_length=cfg.max_seq_length,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope" if cfg.position_embedding == "rope" else "learned_absolute",
        rotary_base=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        pg_collection=pgc,
    )
    if cfg.position_embedding == "rope":
        rope = DeviceRotaryEmbedding(
            kv_channels=tcfg.kv_channels, rotary_percent=1.0, rotary_interleaved=tcfg.rotary_interleaved,
            rotary_base=cfg.rope_theta, rope_scaling=cfg.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.rope_scaling_factor or 8.0, use_cpu_initialization=True,
            cp_group=model.rotary_pos_emb.cp_group,
        )
        rope.inv_freq = rope.inv_freq.to(device)  # a plain attribute, not moved by Module.to
        model.rotary_pos_emb = rope
    model.to(device)
    # megatron-core's torch norms and learned position embedding ignore params_dtype and are
    # created in fp32; the model runs in one dtype (as Megatron-LM's Float16Module and Hugging
    # Face models do): torch fuses RMSNorm into one kernel only when input and weight share it,
    # and an fp32 position embedding promotes the hidden states to fp32, which the first bf16
    # linear rejects. Only these torch modules: Transformer Engine's keep their own state.
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.Embedding)):
            module.to(dtype)
    model.layer_offset = get_transformer_layer_offset(tcfg, pp_rank=groups.pp_rank)
    model.param_specs = param_specs(model, cfg, groups.tp_rank, layout.tp, model.layer_offset)
    if seed is not None:
        init_parameters(model, model.param_specs, cfg, seed)
    if recompute:
        model.require_direct_layers("training.recompute")
        for layer in model.decoder.layers:
            layer.recompute = True
    if compile:
        compile_layers(model)
    if cuda_graphs:
        attach_layer_graphs(model)
    return model

