"""The lean teacher: a frozen GPT that turns micro-batches into top-k payloads.

No gradients, no gradient buffer, no optimizer state, no data-parallel wrapper: parameters are
built in the run dtype (bf16 on GPU), loaded from a kdtrain checkpoint (any TP/PP layout) or a Hugging Face directory, set to
``requires_grad=False`` and run under ``torch.no_grad`` in eval mode. Its forward reuses the
role's pipeline schedule (forward only); on the last stage the vocab-parallel logits become the
payload (top-k ids and logits, the log-mass of the rest at the loss temperature, checksum of the input
tokens) and are dropped. A micro-batch with target flags gets logits, and so a payload, at its
targets only (MicroBatch.logit_rows): the student reads nothing else. ``TeacherSideStats``: what
the teacher ranks did in a logging window, for the student's log.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..models import KDGPTModel, build_gpt, transformer_engine_layers
from ..parallel import RoleGroups
from ..stream import Payload, PayloadSpec, token_checksum, vocab_parallel_topk
from ..stream.channel import PayloadChannel
from .batches import MicroBatch
from .checkpoint_load import load_model_weights
from .pipeline import PipelineSchedule
from .pretrain import check_fits
from .replica_reads import Replicas


class Teacher:
    def __init__(self, model_cfg: ModelConfig, groups: RoleGroups, spec: PayloadSpec, tau: float,
                 load: Optional[str], device: torch.device, dtype: torch.dtype, seed: int,
                 compile: bool = False, tokenizer: Optional[str] = None):
        self.cfg, self.groups, self.spec, self.tau = model_cfg, groups, spec, tau
        # Never trains: its dropout is off, so attention dropout does not rule out TE layers.
        use_te = transformer_engine_layers(model_cfg, groups.layout.tp, device, trains=False)
        check_fits(model_cfg, groups, device, dtype)
        self.model: KDGPTModel = build_gpt(model_cfg, groups, device=device, dtype=dtype,
                                           seed=seed if load is None else None, compile=compile, use_te=use_te)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if load is not None:
            params = [(self.model.param_specs[n], p) for n, p in self.model.named_parameters()]
            error = None
            try:
                shared = load_model_weights(load, model_cfg, params, "teacher", tokenizer=tokenizer,
                                            share=groups.share, replicas=Replicas.of(groups))
            except Exception as e:  # noqa: BLE001 - any failure: the other ranks must not wait for this one
                error = e
            loading = f"could not load its part of teacher.load {load}"
            groups.raise_together(error, loading)
            # Each value read by one data-parallel replica, sent to the others.
            shared.send(lambda e: groups.raise_together(e, loading))
        self.schedule = PipelineSchedule(self.model, groups, (spec.seq_length, spec.micro_batch,
                                                              model_cfg.hidden_size), dtype, device)
        self.device = device

    def _forward_step(self, model: KDGPTModel, mb: MicroBatch):
        output = mb.forward(model)

        def to_payload(logits_SBVl: torch.Tensor, total_tokens):
            payload = self.spec.empty(self.device)
            ids, values, tail_lse = vocab_parallel_topk(logits_SBVl, self.spec.k, self.cfg.vocab_size,
                                                        self.groups.pgc.tp, tau=self.tau)
            if mb.logit_rows is None:
                payload.ids.copy_(ids)
                payload.values.copy_(values)
                payload.tail_lse.copy_(tail_lse)
            else:  # logits of the targets only: their rows are filled, the others zero (never read)
                payload.buffer.zero_()
                rows, k = mb.logit_rows, self.spec.k
                payload.ids.view(-1, k).index_copy_(0, rows, ids.view(-1, k).to(payload.ids.dtype))
                payload.values.view(-1, k).index_copy_(0, rows, values.view(-1, k).to(payload.values.dtype))
                payload.tail_lse.view(-1).index_copy_(0, rows, tail_lse.view(-1))
            payload.checksum.copy_(token_checksum(mb.tokens))
            zero = logits_SBVl.new_zeros(())
            return zero, zero, {"payload": payload}

        return output, to_payload

    @torch.no_grad()
    def serve(self, mb: MicroBatch) -> Optional[Payload]:
        """Run one micro-batch through this rank's stage; the payload on the last stage, else None."""
        reports = self.schedule.forward_only(self._forward_step, [mb], total_tokens=1.0)
        return reports[0]["payload"] if reports else None

    def memory_report(self) -> dict[str, float]:
        """This rank's teacher bytes, next to what a trainable (DDP + Adam) copy would hold."""
        n = sum(p.numel() for p in self.model.parameters())
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # A trained copy adds an fp32 gradient buffer, fp32 master weights (when the weights are
        # not fp32) and two fp32 Adam moments per parameter.
        master = 0 if self.model.parameters().__next__().dtype == torch.float32 else 4 * n
        trainable = weights + 4 * n + master + 8 * n
        return {"teacher_params": float(n), "teacher_weight_bytes": float(weights),
                "teacher_trainable_equiv_bytes": float(trainable)}


class TeacherSideStats:
    """Teacher-side timers and payload bytes, accumulated per rank and averaged over the teacher
    ranks and steps of a logging window by :meth:`collect` (a world all-reduce: every rank calls
    it on the same steps; a teacher-only rank leaves it running, :meth:`finish` waits)."""

    def __init__(self, device):
        self.device = device
        self.compute_s = self.blocked_s = 0.0
        self.bytes_sent = 0.0
        self.steps = 0
        self._events: list = []  # (start, end) CUDA events of the teacher forwards not yet read
        self._pending = None  # (work, tensor) of a reduction started without waiting

    def begin(self):
        """Start timing one teacher forward. On GPU a CUDA event, read at :meth:`collect`: the
        device time of the teacher's kernels without a host sync per forward, which would keep
        the host from queueing the student's work while the GPU runs the teacher's."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def end(self, start) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((start, end))
        else:
            self.compute_s += time.perf_counter() - start

    def end_step(self, channel: PayloadChannel) -> None:
        self.bytes_sent += channel.bytes_sent
        channel.bytes_sent = 0
        self.steps += 1

    def finish(self) -> None:
        """Wait for a reduction :meth:`collect` left running (on NCCL: order it before the
        stream's later work)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def collect(self, wait: bool = True) -> dict:
        """The window's means (``{}`` without teacher ranks, or when ``wait`` is False). With
        ``wait`` False (a teacher-only rank, whose result nobody logs) the all-reduce is only started: the rank goes on
        with its next forwards and the reduction completes when the logging ranks join it."""
        self.finish()
        for start, end in self._events:
            end.synchronize()
            self.compute_s += start.elapsed_time(end) / 1e3
        self._events.clear()
        vec = torch.tensor([self.compute_s, self.blocked_s, self.bytes_sent, float(self.steps > 0), self.steps],
                           dtype=torch.float64, device=self.device)
        self.compute_s = self.blocked_s = self.bytes_sent = 0.0
        self.steps = 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(vec, async_op=True)
            if not wait:
                self._pending = (work, vec)
                return {}
            work.wait()
        compute, blocked, sent, ranks, rank_steps = vec.tolist()
        if not ranks:
            return {}
        steps = rank_steps / ranks
        return {"teacher_compute_s": compute / ranks / steps, "student_wait_s": blocked / ranks / steps,
                "payload_bytes_per_step": sent / steps}
