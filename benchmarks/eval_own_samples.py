"""How close a student's own generations are to its teacher: the quantity on-policy distillation
optimises, which a teacher-forced held-out loss does not see.

For each student checkpoint: continuations of held-out prompts are sampled from the student
(kdtrain/models/generate.py, the same seeds for every student), and on the sampled positions the
script reports the teacher's negative log-likelihood of the student's tokens (lower: text the
teacher finds likelier) and KL(teacher || student) and KL(student || teacher) of the next-token
distributions, and the share of sampled tokens outside the teacher's top-k (where top-k KD leaves
the student's distribution free: only the tail's total mass is matched). One process, CPU or one
GPU; after `bash benchmarks/bench_onpolicy.sh`:

    python benchmarks/eval_own_samples.py --teacher /tmp/kdtrain-pruned-init/checkpoints/demo-teacher \\
        --students /tmp/kdtrain-pruned-init/checkpoints/onpolicy-0.0 /tmp/kdtrain-pruned-init/checkpoints/onpolicy-0.5 \\
        --data /tmp/kdtrain-pruned-init/data/demo_text_document --out /tmp/own-samples.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdtrain.data.gpt_dataset import GPTWindowDataset
from kdtrain.models.generate import sample
from kdtrain.parallel import init_distributed, shutdown_distributed
from kdtrain.training.checkpoint_load import load_whole_model


@torch.no_grad()
def log_probs(model, cfg, tokens):
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return F.log_softmax(model(tokens, pos, None)[..., :cfg.vocab_size].float(), dim=-1).transpose(0, 1)  # [b, s, V]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--students", nargs="+", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--topk", type=int, default=64, help="the distillation runs' teacher.topk")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = init_distributed("auto")
    tcfg, teacher = load_whole_model(args.teacher, env.device, torch.float32, "teacher")
    ds = GPTWindowDataset(args.data, args.seq_length, seed=1234, vocab_size=tcfg.vocab_size)
    n = min(args.prompts, ds.num_valid_windows)
    windows = np.stack([ds.valid_sample(j) for j in range(n)])
    rows = []
    for path in args.students:
        scfg, student = load_whole_model(path, env.device, torch.float32, Path(path).name)
        sums = {"teacher_nll": 0.0, "kl_teacher_student": 0.0, "kl_student_teacher": 0.0,
                "sampled_outside_teacher_topk": 0.0}
        count = 0
        for i in range(0, n, args.batch):
            prompts = torch.from_numpy(windows[i:i + args.batch, :args.prompt_length]).to(env.device)
            seqs = sample(student, prompts, args.seq_length, vocab_size=scfg.vocab_size, temperature=args.temperature,
                          seed=0, sample_ids=list(range(i, i + prompts.shape[0])))
            lt, ls = log_probs(teacher, tcfg, seqs[:, :-1]), log_probs(student, scfg, seqs[:, :-1])
            at = slice(args.prompt_length - 1, None)  # positions whose next token was sampled
            nxt = seqs[:, args.prompt_length:]
            sums["teacher_nll"] += float(-lt[:, at].gather(-1, nxt.unsqueeze(-1)).sum())
            sums["kl_teacher_student"] += float((lt[:, at].exp() * (lt[:, at] - ls[:, at])).sum())
            sums["kl_student_teacher"] += float((ls[:, at].exp() * (ls[:, at] - lt[:, at])).sum())
            top = lt[:, at].topk(args.topk, dim=-1).indices
            sums["sampled_outside_teacher_topk"] += float((top != nxt.unsqueeze(-1)).all(-1).sum())
            count += nxt.numel()
        row = {"student": path, **{k: v / count for k, v in sums.items()}, "tokens": count}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    shutdown_distributed()


if __name__ == "__main__":
    main()
