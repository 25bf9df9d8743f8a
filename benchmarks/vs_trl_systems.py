"""The systems that benchmarks/bench_vs_trl.py compares, and what they share: model pairs, the
data, the common full-vocabulary evaluation, TRL's GKDTrainer run, kdtrain's distill run, and the
preparation of the models (random-init HF -> safetensors -> kdtrain checkpoint). See that script's
docstring for the method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, initializer_range=0.02,
              tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
_QWEN = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, initializer_range=0.02,
             tie_word_embeddings=True, use_sliding_window=False)


def _arch(base: dict, hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, **kw) -> dict:
    return {**base, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab, **kw}


def _from_model_yaml(name: str, fallback: dict) -> dict:
    """HF config of ``configs/models/<name>.yaml`` (exported with kdtrain.convert), else ``fallback``."""
    path = REPO / "configs" / "models" / f"{name}.yaml"
    if not path.is_file():
        return fallback
    from kdtrain.config import load_model_config
    from kdtrain.convert.hf_config import hf_config_from_model

    hf = hf_config_from_model(load_model_config(str(path)), "llama")
    drop = ("architectures", "kdtrain_model", "dtype", "torch_dtype", "rope_scaling", "rope_theta")
    return {k: v for k, v in hf.items() if k not in drop}


PRESETS = {
    "cpu-tiny": dict(
        teacher=_arch(_LLAMA, 128, 3, 4, 2, 256, 1021, max_position_embeddings=256),
        student=_arch(_LLAMA, 64, 2, 4, 2, 128, 1021, max_position_embeddings=256),
        seq_length=64, micro_batch=2, global_batch=4, steps=3, warmup=1, lr=1e-4),
    # ~1.2B Llama-style teacher (Llama-3.2-1B width, 18 layers, tied: 1.16B) -> ~150M student (146M).
    "llama": dict(
        teacher=_from_model_yaml("llama-1.2b-32k", _arch(_LLAMA, 2048, 18, 32, 8, 8192, 32000)),
        student=_from_model_yaml("llama-150m-32k", _arch(_LLAMA, 768, 14, 12, 4, 3072, 32000)),
        seq_length=1024, micro_batch=8, global_batch=32, steps=13, warmup=3, lr=1e-4),
    # Qwen2.5-1.5B and Qwen2.5-0.5B shapes (tied embeddings, QKV bias), the HF table's 151936 rows.
    "qwen": dict(
        teacher=_arch(_QWEN, 1536, 28, 12, 2, 8960, 151936),
        student=_arch(_QWEN, 896, 24, 14, 2, 4864, 151936),
        seq_length=1024, micro_batch=4, global_batch=32, steps=13, warmup=3, lr=1e-4),
}
SYSTEMS = ("trl-gkd", "trl-gkd-liger", "trl-gkd-compiled", "kdtrain-colocated", "kdtrain-colocated-compiled",
           "kdtrain-colocated-graphs", "kdtrain-colocated-graphs-compiled", "kdtrain-disaggregated")
# Default on CPU: the compiled variants compute the same numbers there (tests/test_compile.py) and
# would only add minutes of C++ compilation to a smoke run.
CPU_SYSTEMS = ("trl-gkd", "trl-gkd-liger", "kdtrain-colocated", "kdtrain-disaggregated")


# ---- shared helpers -------------------------------------------------------------------------------
PROFILED_STEPS = 2  # --profile: extra steps after the timed ones, recorded with torch.profiler


def run_steps(job: dict) -> int:
    """Optimizer steps each system runs: the timed ones, plus the profiled ones."""
    return job["steps"] + (PROFILED_STEPS if job.get("profile") else 0)


def profile_window(job: dict):
    return [job["steps"] + 1, run_steps(job)] if job.get("profile") else None


# What the systems' memory is compared by. CUDA max allocated understates a CUDA-graphed run: a
# graph's private memory pool keeps its blocks reserved between replays (and the replays allocate
# nothing), so the allocated peak misses memory no other tensor can use. The caching allocator's
# peak reserved counts those pools, and TRL's and kdtrain's allocations alike (TRL empties the cache
# every micro-batch, which only lowers its reserved figure): the like-for-like figure on CUDA.
MEMORY_COMPARED_NOTE = ("compared by peak reserved on CUDA (torch.cuda.max_memory_reserved: the device memory the "
                        "process's caching allocator held, CUDA-graph pools included; max allocated, "
                        "peak_memory_gib, misses a graphed run's pools), by the process's max RSS on CPU")


def _peak_memory(job: dict) -> dict:
    import torch

    if job["device"] == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
            "peak_reserved_gib": None, "peak_memory_kind": "cpu_max_rss"}


def compared_memory(row: dict) -> tuple[Optional[float], str]:
    """(GiB, key) of the memory figure a system is compared by: peak reserved where the row has it
    (CUDA), else its peak memory (CPU max RSS)."""
    if row.get("peak_reserved_gib") is not None:
        return row["peak_reserved_gib"], "peak_reserved_gib"
    return row.get("peak_memory_gib"), "peak_memory_gib"


def _flops_per_token(job: dict) -> float:
    """Student training FLOPs + teacher forward FLOPs per token (the MFU numerator, every system)."""
    from kdtrain.config import load_model_config

    s = load_model_config(job["student_yaml"]).flops_per_token(job["seq_length"], training=True)
    t = load_model_config(job["teacher_yaml"]).flops_per_token(job["seq_length"], training=False)
    return s + t


def _rates(job: dict, step_times: list[float], num_devices: int) -> dict:
    import torch

    from kdtrain.training.metrics import peak_tflops

    timed = step_times[job["warmup"]:job["steps"]] or step_times
    dt = sum(timed) / len(timed)
    out = {"step_time_s": dt, "samples_per_s": job["global_batch"] / dt,
           "tokens_per_s": job["global_batch"] * job["seq_length"] / dt, "mfu": None, "step_times_s": step_times}
    if job["device"] == "cuda":
        peak = peak_tflops(torch.device("cuda", 0))
        if peak:
            out["mfu"] = _flops_per_token(job) * out["tokens_per_s"] / num_devices / (peak * 1e12)
    return out


def _windows(job: dict, n: int, valid: bool = False):
    """The first ``n`` train (or held-out) windows of kdtrain's seeded mock dataset (seq + 1 ids each)."""
    from kdtrain.data.mock import MockWindowDataset

    ds = MockWindowDataset(job["seq_length"], job["vocab_size"], job["data_seed"])
    return [(ds.valid_sample if valid else ds.train_sample)(i) for i in range(n)]


def generalized_jsd(student_logits, teacher_logits, beta: float):
    """Per-token generalized JSD over the full vocabulary (TRL's convention, see the top docstring)."""
    import torch

    lq = torch.log_softmax(student_logits.float(), dim=-1)
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    if beta == 0.0:
        return (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1.0:
        return (lq.exp() * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1.0 - beta) * (lq.exp() * (lq - lm)).sum(-1)


def eval_full_vocab_jsd(student, teacher, job: dict, teacher_stats: bool = False):
    """Mean full-vocabulary JSD(student, teacher) on ``eval_samples`` held-out windows, one at a time;
    with ``teacher_stats`` also the teacher's mean entropy (nats) and the mass of its top-``topk``."""
    import torch

    device = next(student.parameters()).device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and job["precision"] == "bf16")
    student.eval()
    teacher.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    n = 0
    with torch.no_grad(), autocast:
        for w in _windows(job, job["eval_samples"], valid=True):
            ids = torch.as_tensor(w[:-1], device=device).unsqueeze(0)
            zt = teacher(input_ids=ids).logits.float()
            d = generalized_jsd(student(input_ids=ids).logits, zt, job["beta"])
            sums[0] += d.sum().item()
            n += d.numel()
            if teacher_stats:
                lp = torch.log_softmax(zt, dim=-1)
                sums[1] += -(lp.exp() * lp).sum().item()
                sums[2] += lp.topk(job["topk"], dim=-1).values.exp().sum().item()
    if not teacher_stats:
        return sums[0].item() / n
    return {"jsd": sums[0].item() / n, "teacher_entropy": sums[1].item() / n, "teacher_topk_mass": sums[2].item() / n}


def _load_hf(path: str, job: dict, teacher: bool):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if teacher and job["precision"] == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(job["device"])


# ---- (a)/(b) TRL ----------------------------------------------------------------------------------
def _tokenizer(vocab_size: int):
    """A local word-level tokenizer over the models' ids (GKDTrainer wants a pad id; nothing is downloaded)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", unk_token="t0", eos_token="t1")


def run_trl(job: dict, liger: bool, compile: bool = False, on_trained: Optional[Callable[[dict], None]] = None) -> dict:
    """TRL's GKDTrainer run; ``on_trained(result)`` gets the result before the evaluation (its
    ``eval_full_vocab_jsd`` None), so a run cut off during the evaluation keeps its timings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    t_start = time.perf_counter()
    cuda = job["device"] == "cuda"
    bf16 = job["precision"] == "bf16"
    # Pre-tokenised rows and a collator: no chat template, no tokenisation. kdtrain feeds w[:-1] and
    # predicts w[1:]; GKDTrainer shifts inside its loss, so it gets the same w[:-1] (labels only mask).
    rows = [{"input_ids": w[:-1].tolist()} for w in _windows(job, job["global_batch"] * run_steps(job))]

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    wanted = dict(
        output_dir=str(Path(job["work"]) / ("trl-liger" if liger else "trl-compiled" if compile else "trl")),
        lmbda=0.0, beta=job["beta"], torch_compile=compile,
        seq_kd=False, temperature=1.0, max_length=job["seq_length"], per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["global_batch"] // job["micro_batch"], max_steps=run_steps(job),
        learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=job["weight_decay"],
        adam_beta1=job["adam_betas"][0], adam_beta2=job["adam_betas"][1], adam_epsilon=job["adam_eps"],
        max_grad_norm=job["clip_grad"], bf16=bf16, fp16=False, gradient_checkpointing=False,
        use_liger_kernel=liger, logging_steps=1, save_strategy="no", report_to="none", seed=job["seed"],
        data_seed=job["data_seed"], train_sampling_strategy="sequential", dataloader_num_workers=0,
        disable_dropout=True, use_cpu=not cuda, disable_tqdm=True)
    known = {f.name for f in dataclasses.fields(GKDConfig)}
    args = GKDConfig(**{k: v for k, v in wanted.items() if k in known})  # tolerate transformers versions
    student = _load_hf(job["student_hf"], job, teacher=False)
    teacher = _load_hf(job["teacher_hf"], job, teacher=True)
    step_times: list[float] = []
    from kdtrain.training.profiling import StepProfiler, read_profiles

    window = profile_window(job)
    # No Chrome trace for TRL's steps: exporting it takes seconds per system and nothing returns it
    # (run_h100.sh packs kdtrain's traces only).
    profiler = StepProfiler(tuple(window) if window else None, args.output_dir, 0, torch.device(job["device"]),
                            trace=False)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            profiler.begin(state.global_step + 1)
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)
            profiler.end(state.global_step)  # counts the step just finished

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_tokenizer(job["vocab_size"]), data_collator=collate, callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    mem = _peak_memory(job)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    flags = {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool, type(None), list))}
    flags["not_in_this_version"] = sorted(set(wanted) - known)
    profile = read_profiles(args.output_dir)
    res = {"num_devices": 1, **_rates(job, step_times, 1), **mem, "peak_memory_per_device_gib": [mem["peak_memory_gib"]],
           "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
           "loss_kind": "generalized JSD, full vocabulary", "losses": losses,
           "phases_s": {"setup": t0 - t_start, "train": t1 - t0},
           "eval_full_vocab_jsd": None, "flags": flags, **({"profile": profile} if profile else {})}
    if on_trained is not None:
        on_trained(res)
    res["eval_full_vocab_jsd"] = eval_full_vocab_jsd(trainer.model, trainer.teacher_model, job)
    res["phases_s"]["eval"] = time.perf_counter() - t1
    return res


# ---- (c)/(d) kdtrain ------------------------------------------------------------------------------
def kdtrain_config(job: dict, variant: str) -> dict:
    """Run config of kdtrain variant ``colocated``, ``colocated-compiled``, ``colocated-graphs``,
    ``colocated-graphs-compiled`` (graphed student, compiled teacher) or ``disaggregated``."""
    run_dir = Path(job["work"]) / f"kdtrain-{variant}"
    mode = variant.removesuffix("-compiled").removesuffix("-graphs")
    split = {"mode": mode, "timeout_s": 600}
    if mode == "disaggregated":
        split.update(teacher_ranks=1, depth=2)
    return {
        "teacher": {"model": job["teacher_yaml"], "load": job["teacher_ckpt"], "tp": 1, "topk": job["topk"]},
        "student": {"model": job["student_yaml"], "load": job["student_ckpt"], "tp": 1},
        "split": split,
        "data": {"mock": True, "seq_length": job["seq_length"], "seed": job["data_seed"]},
        "loss": {"divergence": "jsd", "beta": job["beta"], "tau": 1.0, "alpha": 0.0},
        "training": {"micro_batch_size": job["micro_batch"], "global_batch_size": job["global_batch"],
                     "train_steps": run_steps(job), "eval_batches": 0, "seed": job["seed"]},
        "optimizer": {"lr": job["lr"], "min_lr": job["lr"], "warmup_steps": 0, "decay_style": "constant",
                      "weight_decay": job["weight_decay"], "beta1": job["adam_betas"][0],
                      "beta2": job["adam_betas"][1], "eps": job["adam_eps"], "clip_grad": job["clip_grad"]},
        "precision": {"device": job["device"], "dtype": job["precision"], "compile": variant.endswith("-compiled"),
                      "cuda_graphs": "-graphs" in variant},
        "logging": {"dir": str(run_dir), "interval": 1, "progress_bar": False, "tensorboard": False,
                    "profile_steps": profile_window(job)},
        "checkpoint": {"dir": str(run_dir / "ckpt"), "keep": 1},  # the final student, for the evaluation
    }


class _WeightsOnly:
    """An optimizer as the checkpoint writer sees it, minus Adam's moments: the bench saves the
    trained student only to export it, so the checkpoint holds the fp32 master weights (what the
    export reads), not the optimizer state (the Qwen pair's 0.5B student: ~2 GB instead of ~6 GB
    written and deleted per run)."""

    def __init__(self, optimizer):
        self._opt = optimizer

    def __getattr__(self, name):
        return getattr(self._opt, name)

    def state_for(self, spec):
        return {k: v for k, v in self._opt.state_for(spec).items() if k == "master"}


def _save_weights_only() -> None:
    """Make distill's end-of-run checkpoint weights only (see :class:`_WeightsOnly`)."""
    import kdtrain.training.distill as distill_mod

    save_role = distill_mod.save_role

    def weights_only(ck, model, role, step, run, background=False):
        return save_role(ck, model, dataclasses.replace(role, optimizer=_WeightsOnly(role.optimizer)), step, run,
                         background)

    distill_mod.save_role = weights_only


def run_kdtrain_rank(job: dict, variant: str) -> None:
    """One torchrun rank: distill; write this rank's peak memory (``rank<R>.json``, phase
    "trained": what the report's row needs but the evaluation); the last rank (the student's
    writer in both splits) then exports the trained student to HF, scores it and rewrites its
    record with the score (phase "done")."""
    import torch
    import yaml

    from kdtrain.config.distill import load_distill_config
    from kdtrain.parallel import shutdown_distributed
    from kdtrain.training.distill import distill

    cfg_dict = kdtrain_config(job, variant)
    run_dir = Path(cfg_dict["logging"]["dir"])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg_path = run_dir / f"distill_rank{rank}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    if job["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    _save_weights_only()
    t0 = time.perf_counter()
    try:
        distill(load_distill_config(str(cfg_path)))
    finally:
        rec = {**_peak_memory(job), "phases_s": {"distill": time.perf_counter() - t0}, "phase": "trained"}
        shutdown_distributed()
    (run_dir / f"rank{rank}.json").write_text(json.dumps(rec))
    if rank == world - 1:
        from kdtrain.convert.hf_export import export_hf

        t1 = time.perf_counter()
        hf_dir = export_hf(cfg_dict["checkpoint"]["dir"], run_dir / "hf_student")
        shutil.rmtree(cfg_dict["checkpoint"]["dir"])  # no longer needed
        t2 = time.perf_counter()
        rec["eval_full_vocab_jsd"] = eval_full_vocab_jsd(_load_hf(str(hf_dir), job, False),
                                                         _load_hf(job["teacher_hf"], job, True), job)
        rec["phases_s"].update(export=t2 - t1, eval=time.perf_counter() - t2)
        rec["phase"] = "done"
        tmp = run_dir / f"rank{rank}.json.part"
        tmp.write_text(json.dumps(rec))
        tmp.replace(run_dir / f"rank{rank}.json")


def collect_kdtrain(job: dict, variant: str, nproc: int) -> dict:
    """The report's row of a kdtrain run from its logs: after the run, or (``eval_full_vocab_jsd``
    None) once every rank has written its "trained" record, before the export and evaluation."""
    from kdtrain.training.profiling import read_profiles

    cfg_dict = kdtrain_config(job, variant)
    run_dir = Path(cfg_dict["logging"]["dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    steps = [train[s] for s in sorted(train)]
    if len(steps) != run_steps(job):
        raise ValueError(f"kdtrain logged {len(steps)} of {run_steps(job)} steps")
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    mem = [r["peak_memory_gib"] for r in ranks]
    losses = [r["loss"] for r in steps]
    reserved = [r["peak_reserved_gib"] for r in ranks if r["peak_reserved_gib"] is not None]
    return {"num_devices": nproc, **_rates(job, [r["step_time_s"] for r in steps], nproc),
            "peak_memory_gib": max(mem), "peak_reserved_gib": max(reserved) if reserved else None,
            "peak_memory_per_device_gib": mem, "peak_memory_kind": ranks[0]["peak_memory_kind"],
            "first_loss": losses[0], "final_loss": losses[-1],
            "loss_kind": f"generalized JSD over the teacher's top-{job['topk']} + tail bucket", "losses": losses,
            "phases_s": ranks[-1]["phases_s"], "eval_full_vocab_jsd": ranks[-1].get("eval_full_vocab_jsd"),
            "teacher_wait_s": [r.get("teacher_wait_s") for r in steps], "flags": cfg_dict,
            **({"profile": read_profiles(run_dir)} if job.get("profile") else {})}


def trained_row(job: dict, system: str, nproc: int) -> Optional[dict]:
    """A system's row once its training has finished but before its evaluation ended (None until
    then): what a run cut off during its export or evaluation still reports."""
    try:
        if system.startswith("kdtrain"):
            run_dir = Path(job["work"]) / system
            if not all((run_dir / f"rank{r}.json").is_file() for r in range(nproc)):
                return None
            return collect_kdtrain(job, system.removeprefix("kdtrain-"), nproc)
        path = Path(job["work"]) / f"{system}.trained.json"
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, KeyError, IndexError, ValueError):  # a file being written: try again later
        return None


# ---- preparation ---------------------------------------------------------------------------------
def custom_preset(teacher_dir: str, student_dir: str, base: dict) -> dict:
    """The user's own pair of Hugging Face model directories (their weights), run with ``base``'s
    sequence length, batch, steps and learning rate."""
    from kdtrain.convert.hf_weights import read_hf_config

    cfgs = {}
    for role, d in (("teacher", teacher_dir), ("student", student_dir)):
        try:
            cfgs[role] = read_hf_config(d)
        except ValueError as e:
            raise ValueError(f"--{role}-hf: {e}") from None
    vt, vs = cfgs["teacher"].get("vocab_size"), cfgs["student"].get("vocab_size")
    if vt != vs:
        raise ValueError(f"--teacher-hf has vocab_size {vt} but --student-hf {vs}: the benchmark needs one "
                         "logit table for both (TRL's GKD compares them column by column), and one tokenizer "
                         "padded to two sizes differs too (Qwen2.5-7B and larger: 152064, smaller: 151936); "
                         "pick a pair whose config.json agree")
    return {**base, **cfgs, "teacher_dir": str(Path(teacher_dir).resolve()),
            "student_dir": str(Path(student_dir).resolve())}


def prepare_models(job: dict, preset: dict) -> None:
    """HF teacher/student -> kdtrain checkpoints; score the untrained student. The HF models are the
    user's own directories (``custom_preset``: their weights, imported, never modified) or random
    inits of the preset's configs, saved in bf16 when the run is bf16 (the teacher runs in bf16 and
    the student's fp32 master weights start from the same values in both systems)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdtrain.convert.hf_import import import_hf

    root = Path(job["work"]) / "models"
    dtype = torch.bfloat16 if job["precision"] == "bf16" else torch.float32
    for role in ("teacher", "student"):
        hf_dir, kd_dir = root / f"hf_{role}", root / f"kd_{role}"
        if preset.get(f"{role}_dir"):
            hf_dir = Path(preset[f"{role}_dir"])
            shutil.rmtree(kd_dir, ignore_errors=True)  # the directory's weights may have changed since
            import_hf(hf_dir, kd_dir, name=f"{job['preset']}-{role}")
            job[f"{role}_hf"], job[f"{role}_ckpt"] = str(hf_dir), str(kd_dir)
            job[f"{role}_yaml"] = str(kd_dir / "model.yaml")
            continue
        spec = dict(preset[role])
        stamp = json.dumps({**spec, "dtype": str(dtype), "seed": job["seed"],
                            "scale": job["teacher_logit_scale"] if role == "teacher" else 1.0}, sort_keys=True)
        if not (hf_dir / "stamp.json").is_file() or (hf_dir / "stamp.json").read_text() != stamp:
            shutil.rmtree(hf_dir, ignore_errors=True)
            shutil.rmtree(kd_dir, ignore_errors=True)
            torch.manual_seed(job["seed"] + (role == "teacher"))
            with torch.device(job["device"]):  # fast random init on the GPU
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec),
                                                         dtype=dtype)
            if role == "teacher" and job["teacher_logit_scale"] != 1.0:
                with torch.no_grad():  # the final norm feeds only the output layer: logits x scale
                    model.get_decoder().norm.weight.mul_(job["teacher_logit_scale"])
            model.save_pretrained(hf_dir)
            (hf_dir / "stamp.json").write_text(stamp)
            del model
        if not (kd_dir / "latest").is_file():
            import_hf(hf_dir, kd_dir, name=f"{job['preset']}-{role}")
        job[f"{role}_hf"], job[f"{role}_ckpt"], job[f"{role}_yaml"] = str(hf_dir), str(kd_dir), str(kd_dir / "model.yaml")
    init = eval_full_vocab_jsd(_load_hf(job["student_hf"], job, False), _load_hf(job["teacher_hf"], job, True), job,
                               teacher_stats=True)
    job["eval_full_vocab_jsd_init"] = init.pop("jsd")
    job["teacher_eval"] = init
    if job["device"] == "cuda":
        torch.cuda.empty_cache()


def prebuild_kernel(job: dict) -> dict:
    """Build (or load from the extension cache) the fused KD-loss kernel once, outside the timings."""
    if job["device"] != "cuda":
        return {"status": "not used on CPU (pure-torch loss)", "loaded": False, "build_s": 0.0}
    from kdtrain.loss._ext import extension_status, load_kernels

    t0 = time.perf_counter()
    loaded = load_kernels() is not None
    status = extension_status()
    if not loaded:  # kdtrain then runs the pure-torch reference loss: slower, and the report must say so
        print(f"warning: the fused KD-loss kernels did not load, kdtrain runs the reference loss: {status}",
              file=sys.stderr, flush=True)
    return {"status": status, "loaded": loaded, "build_s": time.perf_counter() - t0}
