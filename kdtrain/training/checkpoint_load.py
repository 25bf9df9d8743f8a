"""Loading what a checkpoint (checkpoint.py) or a Hugging Face directory holds into a rank's
model and optimizer: the weights alone (a teacher, a trained model's start, the tools that hold a
whole model), or a run's whole training state to resume it, and the ranks' random states.

Each rank copies the pieces that overlap its own parameters (``CheckpointReader``), whatever the
layout that wrote them; the data-parallel replicas of a slice share the reading
(replica_reads.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch

from ..cli import missing
from ..config import ModelConfig, to_dict
from ..config.model import weight_differences
from ..models.params import ParamSpec
from .checkpoint import STATE_KEYS, CheckpointReader
from .optimizer import AdamWOptimizer
from .replica_reads import Replicas, SharedReads
from .step_dirs import latest_checkpoint


def load_model_weights(path: str | os.PathLike, model: ModelConfig,
                       params: list[tuple[ParamSpec, torch.nn.Parameter]], what: str,
                       masters: Optional[dict[int, tuple[torch.Tensor, int, int]]] = None,
                       tokenizer: Optional[str] = None, share: tuple[int, int] = (0, 1),
                       replicas: Optional[Replicas] = None) -> SharedReads:
    """``{what}.load``: this rank's weights from a kdtrain checkpoint (a run's checkpoint dir, i.e.
    its latest step, or one step dir) written with any layout, or from a Hugging Face model
    directory (convert/hf_weights.py: each rank reads and converts only its own parameters);
    ``masters`` as for ``load_weights``. ``tokenizer``: the fingerprint of the loading run's
    tokenizer (``data_tokenizer``); a checkpoint trained on ids of another is refused (same
    vocabulary size or not, its rows mean other tokens). ``share``: as ``CheckpointReader``'s (the
    caller's ranks agree on the outcome); ``replicas``: as ``load_weights``'s (the caller sends
    the returned reads once its ranks agreed)."""
    from ..convert.hf_weights import HFWeights, is_hf_model_dir  # convert imports this module

    if is_hf_model_dir(path):
        reader = HFWeights(path, model, what)
    else:
        if not Path(path).exists():
            raise ValueError(f"{what}.load: {missing(path)} does not exist (expected a kdtrain checkpoint or a "
                             "Hugging Face model directory)")
        reader = CheckpointReader(latest_checkpoint(path) or path, share)
        try:
            check_checkpoint_model(reader, model)
        except ValueError as e:
            raise ValueError(f"{what}.load: {e}") from None
        theirs = reader.meta.get("tokenizer_fingerprint")
        if tokenizer is not None and theirs is not None and theirs != tokenizer:
            tok = (reader.meta.get("data") or {}).get("tokenizer")
            raise ValueError(f"{what}.load: {reader.path} was trained on ids of tokenizer {theirs}"
                             f"{f' ({tok})' if tok else ''}, this run's data is of tokenizer {tokenizer}: the "
                             "model's rows would mean other tokens")
    return load_weights(reader, params, masters, replicas)


def load_whole_model(path: str | os.PathLike, device: torch.device, dtype: torch.dtype, what: str,
                     model: Optional[ModelConfig] = None, use_te: Optional[bool] = None,
                     tokenizer: Optional[str] = None):
    """(config, model) of a kdtrain checkpoint or Hugging Face directory held whole on one device
    (tp = pp = 1), in eval mode, for the tools that run a model alone (prune, generate, eval).
    The config is the one ``path`` records unless ``model`` is given; ``use_te``: as ``build_gpt``
    (False: kdtrain's local layers, whose modules hooks can read); ``tokenizer``: the fingerprint
    of the ids the tool feeds it, as for ``load_model_weights``. Needs a process group
    (``parallel.one_process_world``)."""
    from ..convert.sources import open_weights
    from ..models import build_gpt
    from ..parallel import RoleLayout, build_role_groups, free_memory_bytes

    cfg = model if model is not None else open_weights(path).cfg
    # The weights alone must fit (activations come on top): an early error, not an out-of-memory
    # failure partway through building a model too large for one device.
    need, free = cfg.num_params() * torch.empty((), dtype=dtype).element_size(), free_memory_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"{what} {path}: the whole model ({cfg.num_params() / 1e9:.2f}B parameters) needs "
                         f"{need / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')}, but "
                         f"{device} has {free / 2**30:.1f} GiB free (this tool holds the model on one device)")
    net = build_gpt(cfg, build_role_groups(RoleLayout(what, 0, 1, 1, 1)), device=device, dtype=dtype, seed=None,
                    use_te=use_te)
    load_model_weights(path, cfg, [(net.param_specs[n], p) for n, p in net.named_parameters()], what,
                       tokenizer=tokenizer)
    return cfg, net.eval()


def check_checkpoint_model(reader: CheckpointReader, model: ModelConfig) -> None:
    """Same weights as the checkpoint's model (training-only fields such as dropout, and with
    rotary positions the longest sequence, may differ: config/model.py weight_differences)."""
    saved = dict(reader.meta.get("model", {}))
    ours = to_dict(model)
    diff = weight_differences(saved, model)
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {reader.path} was written for a different model: {k} = {saved.get(k)!r} "
                         f"there, {ours.get(k)!r} here (differing fields: {diff})")


@torch.no_grad()
def load_weights(reader: CheckpointReader, params: list[tuple[ParamSpec, torch.nn.Parameter]],
                 masters: Optional[dict[int, tuple[torch.Tensor, int, int]]] = None,
                 replicas: Optional[Replicas] = None) -> SharedReads:
    """Model weights only (teacher, fine-tuning, evaluation, a trained model's start). ``masters``:
    ``(master, start, stop)`` by ``id`` of the parameter: the fp32 master weight of its flat
    elements [start, stop), where an optimizer keeps one apart from the parameter
    (``AdamWOptimizer.separate_masters``); it gets the stored fp32 values too, else the first
    update would start from the weights the optimizer was built with.

    ``replicas``: the data-parallel replicas loading the same slice: the returned reads' ``send``
    (every rank of the role calls it once the role agreed on the load so far) reads each
    parameter on one replica and gives it to all (replica_reads.py). Without, every parameter is
    read and set here (``send`` only joins the role's agreement)."""
    _check_holds(reader, params)
    # The values go round in fp32 where an optimizer keeps masters, else in the parameters' own
    # dtype: alike on every replica (with ZeRO-1 ``masters`` holds a replica's own chunks only).
    fp32 = masters is not None
    masters = masters or {}
    shared = SharedReads(replicas, params[0][1].device if params else torch.device("cpu"))
    for (spec, p), owner in zip(params, shared.owners([p.numel() for _, p in params])):
        dtype = torch.float32 if fp32 else p.dtype
        shared.add(owner, [("value", tuple(p.shape), dtype)], functools.partial(_read_value, reader, spec, p, dtype),
                   functools.partial(_set_weights, p, masters.get(id(p))))
    return shared


def _read_value(reader: CheckpointReader, spec: ParamSpec, p: torch.nn.Parameter, dtype: torch.dtype) -> dict:
    value = torch.zeros(p.shape, dtype=torch.float32)
    reader.read_into(spec, "master", value)
    return {"value": value.to(dtype)}


def _set_weights(p: torch.nn.Parameter, master: Optional[tuple[torch.Tensor, int, int]], got: dict) -> None:
    value = got["value"]
    p.copy_(value.to(p.dtype))
    if master is not None:
        m, start, stop = master
        m.view(-1).copy_(value.view(-1)[start:stop])


def _check_holds(reader: CheckpointReader, params: list[tuple[ParamSpec, torch.nn.Parameter]]) -> None:
    missing = {s.global_name for s, _ in params} - reader.names()
    if missing:
        raise ValueError(f"checkpoint {reader.path} lacks {len(missing)} parameters of this model, "
                         f"e.g. {sorted(missing)[:3]} (different model config?)")


@torch.no_grad()
def load_training_state(reader: CheckpointReader, optimizer: AdamWOptimizer,
                        replicas: Optional[Replicas] = None) -> SharedReads:
    """Weights of every parameter, plus master weights and Adam moments of this rank's shares; each
    stored value is read once (an owned parameter's weights are copied from its master). With the
    distributed optimizer the parameters come from the owners' masters: every replica calls
    ``optimizer.gather_params()`` afterwards, once all have read their shares (restore_role).
    Without it the replicas hold the same state: with ``replicas``, as ``load_weights`` (the
    returned reads' ``send`` reads each value on one replica and gives it to all)."""
    _check_holds(reader, optimizer.params)
    if not reader.has_optimizer_state():
        raise ValueError(f"checkpoint {reader.path} has no optimizer state; use checkpoint.load to start "
                         "from its weights instead of resuming")
    if optimizer.sharded:
        # Each replica reads its chunk only (master weights and moments: the files that hold it,
        # not every file of its stage and tensor slice) and the parameters are all-gathered from
        # the owners' masters, as after an update. Vocabulary padding stays zero.
        for share in optimizer.owned:
            state = {}
            for key in STATE_KEYS:
                state[key] = torch.zeros(share.stop - share.start, dtype=torch.float32)
                reader.read_into(share.spec, key, state[key], flat=(share.start, share.stop))
            state["step"] = reader.read_step_state(share.spec)
            optimizer.load_state_for(share.spec, state)
        return SharedReads(None, torch.device("cpu"))
    owned = {id(s.param) for s in optimizer.owned}
    shared = load_weights(reader, [(spec, p) for spec, p in optimizer.params if id(p) not in owned],
                          replicas=replicas)
    shared.device = optimizer.params[0][1].device  # where the values are sent (NCCL: the GPU)
    for share, owner in zip(optimizer.owned, shared.owners([s.param.numel() for s in optimizer.owned])):
        shared.add(owner, [*((key, tuple(share.param.shape), torch.float32) for key in STATE_KEYS),
                           ("step", (), torch.float32)], functools.partial(_read_state, reader, share.spec,
                                                                           share.param.shape),
                   functools.partial(optimizer.load_state_for, share.spec))
    return shared


def _read_state(reader: CheckpointReader, spec: ParamSpec, shape: torch.Size) -> dict:
    """A whole parameter's fp32 master, Adam moments and step count, on the host."""
    state = {}
    for key in STATE_KEYS:
        state[key] = torch.zeros(shape, dtype=torch.float32)
        reader.read_into(spec, key, state[key])
    state["step"] = reader.read_step_state(spec).float()
    return state


def restore_rng(path: Path, rank: int) -> bool:
    """This rank's random states from checkpoint ``path``; False when it holds no file of the rank."""
    f = path / "rng" / f"rank{rank:05d}.pt"
    if not f.is_file():
        return False
    try:
        state = torch.load(f, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except Exception as e:  # truncated, replaced or foreign file
        # torch's own text for an unpicklable file advises loading it with weights_only=False:
        # wrong for a damaged file, so that text is left out (a reader's error, e.g. a truncated
        # archive, is kept: its first line).
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        why = type(e).__name__ + ("" if not first or "weights_only" in first else f": {first}")
        raise ValueError(f"cannot restore the random states of rank {rank} from {f}: the file is damaged or not "
                         f"a kdtrain random-state file ({why}); resume from another step (its directory name in "
                         "the checkpoint folder's 'latest') or restore the file") from None
    return True
