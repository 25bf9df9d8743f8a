"""Sampling continuations from a GPT (the student's own sequences for on-policy distillation).

``sample(model, prompts, total_length, ...)`` extends each prompt to ``total_length`` tokens, one
token at a time, on a model held whole in depth (any tensor parallelism).
``sample_replies(model, windows, spans, ...)`` rewrites the replies of each row instead
(conversations: the model writes a reply where the data has one, stops at its end-of-turn token,
and the data's next turn follows). Rows are decoded together from the shortest prompt: a row
that is not sampling is fed its own next token (teacher forcing).

Key/value cache. Layers on the direct forward (models/layer.py, the local spec) keep each
position's keys and values in a preallocated ``[total_length, b, groups, head_dim]`` cache: the
prompt is one forward, every new token a one-position forward attending to the cache. Other
layers (Transformer Engine's spec) fall back to re-running the whole prefix per token; the tokens
are the same (in fp32; in bf16 up to rounding: the paths' logits differ by about one bf16 step, so
a draw near a boundary of the cumulative sum can differ), the cost quadratic.

Pipeline stages (``stages``, a model split in depth): every forward passes the new positions'
hidden states from stage to stage (point to point), the last stage picks the tokens and
broadcasts them over the pipeline group, and every stage then advances the same per-row state,
so all stages hold the same rows. A token costs one hop per stage; the key/value caches stay
with their layers.

Randomness that does not depend on the layout. Token ``t`` of sample ``g`` is drawn from
``softmax(logits / temperature)`` over the real vocabulary by inversion: one uniform ``u(seed, g, t)``
(a hash, computed on the host for the whole call) picks the token where the cumulative
probability, in vocabulary order, first exceeds ``u``. Tensor ranks hold consecutive vocabulary
slices: they agree on the maximum logit and on each slice's mass (one all-reduce, one small
all-gather), the rank whose slice holds ``u`` picks inside it, and a max all-reduce hands the id to
all. The sequence of sample ``g`` is then the same whatever the tensor- and data-parallel layout,
the micro-batch it is in, or the rank that runs it (up to rounding of the logits near a boundary
of the cumulative sum). ``temperature = 0`` is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from .decode_graph import DecodeStep
from .documents import DocumentMask

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
FILTER_POOL = 1024  # first candidates of a top-p draw without top-k (grown until they hold the nucleus)


def uniforms(seed: int, sample_ids: Sequence[int], start: int, stop: int) -> np.ndarray:
    """float64 [len(sample_ids), stop - start] in (0, 1): entry (i, j) a function of
    (seed, sample_ids[i], start + j) only (splitmix64 of their mix, 53 bits)."""
    g = np.asarray(sample_ids, dtype=np.uint64)[:, None]
    t = np.arange(start, stop, dtype=np.uint64)[None, :]
    m0, m1, m2 = (np.uint64(c) for c in _MIX)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64
        x = np.uint64(seed % 2**64) * m0 + g * m1 + t * m2
        x = (x ^ (x >> np.uint64(30))) * m1
        x = (x ^ (x >> np.uint64(27))) * m2
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _local_top(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, column) of the ``n`` largest of each row of ``z``, ties at the cut going to the
    lower columns, unranked (``_candidates`` ranks them). ``topk`` picks among values tied at its
    cut arbitrarily; a host check for such ties would sync every position of a draw (the decoder
    syncs every 16), so the set is fixed on the device: every column above the cut, then the
    lowest columns equal to it until there are ``n`` (a second ``topk`` over a column key lists
    them). Tied -inf (padding) columns may fill the set; their probability is zero."""
    cut = z.topk(n, dim=-1).values[:, -1:]
    above = z > cut
    tied = z == cut
    take = above | (tied & (tied.cumsum(dim=-1) <= n - above.sum(dim=-1, keepdim=True)))  # n per row
    width = z.shape[-1]
    key = take * (width - torch.arange(width, device=z.device))  # taken columns: > 0, lower column higher
    idx = key.topk(n, dim=-1).indices
    return z.gather(-1, idx), idx


def _candidates(z: torch.Tensor, first: int, n: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [b, n] of the ``n`` most likely tokens over every tensor rank's slice, ranked
    by value then id (ties to the lower id): each rank offers its own ``n`` largest, one all-gather."""
    vals, idx = _local_top(z, min(n, z.shape[-1]))
    ids = (idx + first).double()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        both = torch.stack([vals, ids])
        gathered = [torch.empty_like(both) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(gathered, both, group=tp_group)
        vals, ids = torch.cat(gathered, dim=-1)
    order = ids.argsort(dim=-1, stable=True)
    vals, ids = vals.gather(-1, order), ids.gather(-1, order)
    order = vals.argsort(dim=-1, descending=True, stable=True)[:, :n]
    return vals.gather(-1, order), ids.gather(-1, order)


def _pick_filtered(z: torch.Tensor, first: int, u: torch.Tensor, top_k: int, top_p: float, tp_group) -> torch.Tensor:
    """Sampling restricted to the most likely tokens, in transformers' order: the ``top_k``
    largest of ``z`` (this rank's slice [b, V/tp], starting at id ``first``; 0: all), then the
    smallest of those, by probability, whose mass reaches ``top_p`` of theirs (of the whole
    vocabulary's without top-k). Candidates are ranked by value then id, and the token is picked
    by inversion over the kept ones in id order, so the result is the same in any layout.

    Without top-k the nucleus is looked for among the ``FILTER_POOL`` most likely tokens first;
    when they hold less than ``top_p`` of the whole mass (a flat distribution, a large vocabulary)
    the pool grows eightfold until they do, up to the whole vocabulary."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    width = z.shape[-1]
    n = top_k if top_k > 0 else FILTER_POOL
    vals, ids = _candidates(z, first, n, tp_group)
    top = vals[:, :1]  # the global maximum: the candidates are ranked and hold every rank's largest
    total = None
    if top_k == 0:  # the whole vocabulary's mass, relative to the global maximum (padding: 0)
        total = torch.exp(z - top).sum(dim=-1, keepdim=True)
        if tp > 1:
            dist.all_reduce(total, group=tp_group)
    while True:
        p = torch.exp(vals - top)  # descending; -inf (padding) -> 0
        if total is None or n >= width * tp or bool((p.sum(dim=-1, keepdim=True) >= top_p * total).all()):
            break
        n *= 8
        vals, ids = _candidates(z, first, n, tp_group)
    if top_p < 1.0:
        mass = p.cumsum(dim=-1)
        ref = mass[:, -1:] if total is None else total
        keep = (mass - p) < top_p * ref  # the tokens before it hold less than top_p: kept
        p = p * keep
    by_id = ids.argsort(dim=-1)
    p, ids = p.gather(-1, by_id), ids.gather(-1, by_id)
    cdf = p.cumsum(dim=-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=p.shape[-1] - 1)
    return ids.gather(-1, j)[:, 0].long()


def pick_tokens(logits_bVl: torch.Tensor, vocab_size: int, temperature: float, u: Optional[torch.Tensor],
                tp_group, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next tokens [b] from this rank's vocabulary slice of the last position's logits [b, V/tp]
    (see the module docstring); ``u`` [b] float64 uniforms, unused when ``temperature`` is 0.
    ``top_k`` > 0 / ``top_p`` < 1 restrict the draw to the most likely tokens (_pick_filtered)."""
    b, width = logits_bVl.shape
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    first = rank * width
    ids = torch.arange(first, first + width, device=logits_bVl.device)
    z = logits_bVl.double().masked_fill(ids[None, :] >= vocab_size, float("-inf"))  # padded rows never win
    if temperature == 0:
        best, arg = z.max(dim=-1)
        if tp == 1:
            return arg
        # Greedy: the global maximum, ties to the lower id (rank order is id order).
        cand = torch.stack([best, (arg + first).double()], dim=-1)
        gathered = [torch.empty_like(cand) for _ in range(tp)]
        dist.all_gather(gathered, cand, group=tp_group)
        cand = torch.stack(gathered)
        return cand[cand[..., 0].argmax(dim=0), torch.arange(b, device=cand.device), 1].long()
    z = z / temperature
    if top_k > 0 or top_p < 1.0:
        return _pick_filtered(z, first, u, top_k, top_p, tp_group)
    top = z.max(dim=-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    p = torch.exp(z - top)  # unnormalised, exact zeros on padded rows
    mass = p.sum(dim=-1)  # [b] this slice's share
    if tp > 1:
        masses = [torch.empty_like(mass) for _ in range(tp)]
        dist.all_gather(masses, mass, group=tp_group)
        masses = torch.stack(masses)  # [tp, b]
    else:
        masses = mass[None]
    ends = masses.cumsum(dim=0)  # [tp, b] cumulative mass at the end of each slice
    target = u * ends[-1]
    owner = (ends <= target[None]).sum(dim=0).clamp_(max=tp - 1)  # first slice whose end passes the target
    local = target - (ends[rank] - mass)  # the target in this slice's own units
    idx = torch.searchsorted(p.cumsum(dim=-1), local[:, None], right=True)[:, 0]
    last_real = max(0, min(width, vocab_size - first) - 1)
    idx = (idx.clamp_(max=last_real) + first).where(owner == rank, torch.full_like(idx, -1))
    if tp > 1:
        dist.all_reduce(idx, op=dist.ReduceOp.MAX, group=tp_group)
    return idx


@dataclass(frozen=True)
class DecodeStages:
    """This rank's pipeline neighbours for decoding: global ranks of the previous and next stage
    (None at the ends), of the last stage (whose picks all follow) and the pipeline group."""

    prev: Optional[int]
    next: Optional[int]
    last: int
    group: object

    @classmethod
    def of(cls, groups) -> Optional["DecodeStages"]:
        """From a role's RoleGroups; None when the role has one stage."""
        pp = groups.layout.pp
        if pp == 1:
            return None
        r = groups.pp_rank
        return cls(None if r == 0 else groups.stage_rank(r - 1), None if r == pp - 1 else groups.stage_rank(r + 1),
                   groups.stage_rank(pp - 1), groups.pgc.pp)


def decode_state(model, rows: int, length: int, device, zeroed: bool = False) -> tuple[list, Optional[tuple]]:
    """The key/value caches of the key/value-cached decoder for ``rows`` rows of ``length``
    positions (per layer of this stage, two ``[length, rows, groups/tp, head_dim]`` tensors in the
    model's dtype; ``zeroed``: filled with zeros, else uninitialised) and the rotary (cos, sin)
    tables of those positions (None without rotary embedding)."""
    dtype = next(model.parameters()).dtype
    attn = model.decoder.layers[0].self_attention
    shape = (length, rows, attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head)
    alloc = torch.zeros if zeroed else torch.empty
    caches = [(alloc(shape, dtype=dtype, device=device), alloc(shape, dtype=dtype, device=device))
              for _ in model.decoder.layers]
    rope = None
    if getattr(model, "rotary_pos_emb", None) is not None and model.position_embedding_type == "rope":
        freqs = model.rotary_pos_emb(length)
        rope = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
    return caches, rope


def _cached_layers(model) -> bool:
    return all(getattr(layer, "direct", False) for layer in model.decoder.layers)


def _forward_positions(model, tokens: torch.Tensor, offset: int, rope, caches,
                       doc_pos: Optional[torch.Tensor] = None,
                       stages: Optional[DecodeStages] = None) -> Optional[torch.Tensor]:
    """Logits [b, V/tp] of the last of positions ``[offset, offset + n)``, given their tokens [b, n]
    (every position's keys and values go into the cache); on a pipeline stage before the last,
    the hidden states go to the next stage and the result is None. ``doc_pos`` [b, n]: their positions in
    their documents (attention within documents): a query at ``offset + i`` then sees the keys
    from its document's start ``offset + i - doc_pos[:, i]`` to itself, and rotates by its
    document position (models/documents.py's rule)."""
    b, n = tokens.shape
    allowed = None
    if doc_pos is None:
        pos = torch.arange(offset, offset + n, device=tokens.device).unsqueeze(0).expand(b, n)
        cos_sin = None if rope is None else (rope[0][offset:offset + n], rope[1][offset:offset + n])
    else:
        pos = doc_pos
        cos_sin = None if rope is None else tuple(r[:, 0, 0][pos.t()].unsqueeze(2) for r in rope)  # [n, b, 1, d]
        query = torch.arange(offset, offset + n, device=tokens.device)
        keys = torch.arange(offset + n, device=tokens.device)
        start = query[None, :] - pos  # [b, n]
        allowed = (keys[None, None, :] >= start[:, :, None]) & (keys[None, None, :] <= query[None, :, None])
        allowed = allowed.unsqueeze(1)  # [b, 1, n, offset + n]
    if model.pre_process:
        hidden = model.embedding(input_ids=tokens, position_ids=pos)
    else:
        hidden = torch.empty(n, b, model.config.hidden_size, dtype=caches[0][0].dtype, device=tokens.device)
        dist.recv(hidden, stages.prev, group=stages.group)
    for layer, kv in zip(model.decoder.layers, caches):
        hidden = layer.cached_forward(hidden, cos_sin, kv, offset, allowed)
    if not model.post_process:
        dist.send(hidden.contiguous(), stages.next, group=stages.group)
        return None
    # Only the last position's logits are needed (a prompt's full [P, b, V] would be the largest
    # tensor of the whole call).
    return model._postprocess(model.decoder.final_layernorm(hidden[-1:]))[-1]


def sample(model, prompts: torch.Tensor, total_length: int, *, vocab_size: int, temperature: float, seed: int,
           sample_ids: Sequence[int], tp_group=None) -> torch.Tensor:
    """``prompts`` [b, P] extended to [b, total_length] by sampling (see the module docstring);
    ``sample_ids``: the global dataset sample of each row (the key of its uniforms)."""
    b, P = prompts.shape
    assert 0 < P < total_length, (P, total_length)
    tokens = torch.zeros(b, total_length, dtype=torch.long, device=prompts.device)
    tokens[:, :P] = prompts
    return sample_replies(model, tokens, [[(P, total_length)]] * b, vocab_size=vocab_size, temperature=temperature,
                          seed=seed, sample_ids=sample_ids, tp_group=tp_group)[0]


def _continued_positions(out_pos_t: torch.Tensor, given_pos: torch.Tensor) -> torch.Tensor:
    """Document positions of given tokens that follow a token at position ``out_pos_t`` [b]:
    ``given_pos`` [b, n] are their positions in the data, where only the document starts (0) carry
    over; the others count on from the token before."""
    k = torch.arange(1, given_pos.shape[1] + 1, device=given_pos.device).unsqueeze(0)
    last_start = torch.where(given_pos == 0, k, torch.zeros_like(k)).cummax(dim=1).values
    return torch.where(last_start > 0, k - last_start, out_pos_t.unsqueeze(1) + k)


@torch.no_grad()
def sample_replies(model, windows: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]], *, vocab_size: int,
                   temperature: float, seed: int, sample_ids: Sequence[int],
                   stop_token: Union[int, Sequence[int], None] = None, pad_id: int = 0, tp_group=None, top_k: int = 0, top_p: float = 1.0,
                   positions: Optional[torch.Tensor] = None, stages: Optional[DecodeStages] = None,
                   graphs: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Rewrite each row of ``windows`` [b, L] with the model's own replies.

    ``spans[i]``: the replies of row i as token ranges ``[start, end)`` of the given row, in order
    (start >= 1). The row is fed its given tokens up to the first start; from there the model
    samples until it samples ``stop_token`` (included; one id or several, any of which ends a
    reply) or the row is full; then the given tokens
    resume, right after the sampled ones, from just after the data reply's own last
    ``stop_token`` (its ``end`` when it has none: what a template writes after the end of a turn,
    ChatML's newline, is kept), up to the next start, and so on; given tokens that run out are
    followed by ``pad_id``. Returns the new rows, the flags [b, L] (bool) of the sampled
    positions, and the new rows' document positions (or None). The
    uniform of output position ``t`` of row ``i`` is ``u(seed, sample_ids[i], t)``, as for
    ``sample``, so a row is the same in any batch or layout. With one span per row and no stop
    token this is ``sample``. ``top_k`` / ``top_p``: see ``pick_tokens``.

    ``positions`` [b, L]: the given tokens' positions in their documents (attention within
    documents, models/documents.py). Each token then attends only within its document, as in
    training: a sampled token continues the document it follows, a given token that starts a
    document in the data starts one in the new row, and the returned positions say so.

    ``stages``: this rank's stage of a model split in depth (the module docstring); every stage
    calls this with the same rows and returns the same result.

    ``graphs``: each single-position forward runs as one fixed-shape step (decode_graph.py),
    replayed as a CUDA graph on a CUDA device (eagerly elsewhere); the same tokens (in bf16 up to
    rounding, as for the key/value cache). Needs the whole model on one tensor rank and kdtrain's
    local layers."""
    if not (model.pre_process and model.post_process) and stages is None:
        raise ValueError("sampling from one pipeline stage needs its neighbours (stages)")
    if graphs and (stages is not None or (tp_group is not None and dist.get_world_size(tp_group) > 1)
                   or not _cached_layers(model)):
        raise ValueError("graphed decoding needs the whole model on one rank (tp = pp = 1) with kdtrain's local "
                         "layers")
    b, L = windows.shape
    assert len(sample_ids) == b == len(spans), (len(sample_ids), b, len(spans))
    assert all(s >= 1 for row in spans for s, _ in row), spans
    device = windows.device
    tokens = windows.clone()
    flags = torch.zeros(b, L, dtype=torch.bool, device=device)
    first = min([row[0][0] for row in spans if row] + [L])
    if first >= L:
        return tokens, flags, None if positions is None else positions.clone()
    # Span tables padded with a start no row reaches; per-row state: the next given token to feed
    # (src), the current or next span (rep), and whether the row is sampling.
    R = max(len(row) for row in spans) + 1
    never = 2 * L + 1
    starts = torch.full((b, R), never, dtype=torch.long)
    ends = torch.full((b, R), never, dtype=torch.long)
    stops = None
    if stop_token is not None:
        stops = torch.tensor([stop_token] if isinstance(stop_token, int) else list(stop_token), dtype=torch.long)
    host = windows.cpu() if stops is not None else None
    for i, row in enumerate(spans):
        for j, (s, e) in enumerate(row):
            starts[i, j], ends[i, j] = s, e
            if host is not None:  # resume after the data reply's own stop token: what the template
                # puts after the end of a turn (ChatML's newline) is not part of the reply
                at = torch.isin(host[i, s:e], stops).nonzero()
                if len(at):
                    ends[i, j] = s + int(at[-1]) + 1
    starts, ends = starts.to(device), ends.to(device)
    if stops is not None:
        stops = stops.to(device)
    given = torch.cat([windows, torch.full((b, 1), pad_id, dtype=windows.dtype, device=device)], dim=1)
    rows = torch.arange(b, device=device)
    src = torch.full((b,), first, dtype=torch.long, device=device)
    rep = torch.zeros(b, dtype=torch.long, device=device)
    sampling = torch.zeros(b, dtype=torch.bool, device=device)
    out_pos = given_pos = None
    if positions is not None:
        assert positions.shape == (b, L), (positions.shape, b, L)
        out_pos = positions.clone()
        given_pos = torch.cat([positions, torch.ones(b, 1, dtype=positions.dtype, device=device)], dim=1)
    u = None
    if temperature > 0:  # row i, column t - first: the uniform of output position t of sample_ids[i]
        u = torch.from_numpy(uniforms(seed, sample_ids, first, L)).to(device)
    was_training = model.training
    model.eval()

    def step(logits_bVl, t) -> bool:
        """Place position t; True when no row samples again (the rest is given tokens)."""
        if logits_bVl is not None:
            picked = pick_tokens(logits_bVl, vocab_size, temperature, None if u is None else u[:, t - first],
                                 tp_group, top_k, top_p)
        else:  # a stage before the last: the last stage's picks
            picked = torch.empty(b, dtype=torch.long, device=device)
        if stages is not None:
            dist.broadcast(picked, src=stages.last, group=stages.group)
        sampling.logical_or_(src == starts[rows, rep])
        tokens[:, t] = torch.where(sampling, picked, given[rows, src.clamp(max=L)])
        flags[:, t] = sampling
        if out_pos is not None:
            starts_doc = ~sampling & (given_pos[rows, src.clamp(max=L)] == 0)
            out_pos[:, t] = torch.where(starts_doc, torch.zeros_like(src), out_pos[:, t - 1] + 1)
        src.add_((~sampling).long())
        if stops is not None:
            stopped = sampling & torch.isin(picked, stops)
            src.copy_(torch.where(stopped, ends[rows, rep], src))
            rep.add_(stopped.long())
            sampling.logical_and_(~stopped)
        if t % 16 != 15:  # a device sync: only now and then
            return False
        return not bool((sampling | (starts[rows, rep] < never)).any())

    def feed_given(t, count) -> None:
        """Positions t + 1 .. t + count take the given tokens from each row's src on (then padding)."""
        idx = (src.unsqueeze(1) + torch.arange(count, device=device).unsqueeze(0)).clamp(max=L)
        tokens[:, t + 1:t + 1 + count] = given.gather(1, idx)
        if out_pos is not None:
            out_pos[:, t + 1:t + 1 + count] = _continued_positions(out_pos[:, t], given_pos.gather(1, idx))
        src.add_(count)

    def given_run(t) -> int:
        """How many positions after t every row takes given tokens before any row samples again
        (0 while one samples): they go through the model in one forward, not one each. Read from
        the device with step's periodic check only, so a gap costs at most 15 single forwards."""
        if t % 16 != 15:
            return 0
        gap = int(torch.where(sampling, torch.full_like(src, -1), starts[rows, rep] - src).min())
        return max(0, min(gap, L - 1 - t))

    try:
        if _cached_layers(model):
            # Zeroed for the fixed-shape step, which reads every slot (masked ones with zero weight).
            caches, rope = decode_state(model, b, L, device, zeroed=graphs)
            decode = DecodeStep(model, caches, rope, b, L, graph=device.type == "cuda") if graphs else None
            logits = _forward_positions(model, tokens[:, :first], 0, rope, caches,
                                        None if out_pos is None else out_pos[:, :first], stages)
            t = first
            while t < L:
                if step(logits, t):
                    feed_given(t, L - t - 1)
                    break
                n = 1 + given_run(t)  # positions t .. t + n - 1 go through the model next
                if n > 1:
                    feed_given(t, n - 1)
                if t + n >= L:
                    break
                chunk = slice(t, t + n)
                if decode is not None and n == 1:
                    logits = decode(tokens[:, t], t, None if out_pos is None else out_pos[:, t])
                else:
                    logits = _forward_positions(model, tokens[:, chunk], t, rope, caches,
                                                None if out_pos is None else out_pos[:, chunk], stages)
                t += n
        elif stages is not None:
            raise ValueError("sampling from pipeline stages needs kdtrain's local layers (the key/value-cached "
                             "decoder)")
        else:
            for t in range(first, L):
                last = (t - 1) * b + rows  # logits of the last position only ([s * b] token order)
                if out_pos is None:
                    logits = model(tokens[:, :t], torch.arange(t, device=device).unsqueeze(0).expand(b, t), None,
                                   logit_rows=last)
                else:
                    logits = model(tokens[:, :t], out_pos[:, :t], DocumentMask(out_pos[:, :t].contiguous()),
                                   logit_rows=last)
                if step(logits[:, 0], t):
                    feed_given(t, L - t - 1)
                    break
    finally:
        model.train(was_training)
    return tokens, flags, out_pos
