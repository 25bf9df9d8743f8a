"""Stored per-step curves: three one-rank runs must keep reproducing the losses, gradient norms,
learning rates and held-out losses recorded in ``tests/golden/curves.json``.

The layout tests tie every TP/PP/DP layout, split and cache path to a one-rank run; this module
ties the one-rank runs themselves to the numbers of an earlier commit, so a change to the
initialisation, data order, loss, optimizer or schedule that moves the numerics is seen even when
every layout still agrees with every other. A change that is meant to move them regenerates the
file and says why in its commit:

    python tests/test_golden.py --write                      # rewrite tests/golden/curves.json
    python tests/test_golden.py --sensitivity tests/golden/sensitivity.txt   # re-measure the margins

The runs (tiny model, fp32 on CPU, one rank, one torchrun launch): ``pretrain`` trains the
teacher for 30 steps on a synthetic text corpus; ``distill`` distils it into a random student
(JSD beta 0.5, 20% hard-label cross entropy, top-16) for 10 steps with a held-out evaluation
after step 5; ``distill-chat`` distils it on synthetic conversations (replies the only targets,
best-fit packing, attention within documents). The corpora come from a fixed integer generator,
not from numpy's or Python's random streams or the standard library's text, so they are the same
on any machine.

Tolerances (``TOLERANCE``). Runs on one machine repeat bitwise; between machines the order of
floating-point sums inside the CPU kernels differs (vector width), the teacher's top-k can then
pick another id among near-ties, and Adam carries the difference on. `--sensitivity` measures
that (the same runs with torch's AVX2 and scalar kernels instead of AVX-512) next to small
deliberate changes (learning rate +1%, gradient clip, temperature, weight decay, JSD beta) and
reports each as a multiple of the tolerance: the kernel variants must stay well below 1 and most
deliberate changes above it. The stored results are in ``tests/golden/sensitivity.txt``. On-policy
sampling is left out: one flipped token among few sampled ones moves the curve by far more than
any tolerance would allow (the layout tests pin it on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import read_metrics, run_entries  # noqa: E402

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).resolve().parent / "golden" / "curves.json"
VOCAB, EOS = 512, 0
# What each record kind keeps, when the run logs it.
TRAIN_KEYS = ("loss", "kd_loss", "ce_loss", "grad_norm", "lr")
VALID_KEYS = ("valid_loss", "valid_kd_loss")
# (relative, absolute) tolerance per recorded number: |got - stored| <= rel * |stored| + abs.
# Losses: absolute too, for small KD terms; the gradient norm wanders more than the losses as
# Adam carries rounding on (but catches a gradient scaled by a wrong count, which Adam's
# normalisation hides from the losses); the learning rate is exact arithmetic.
TOLERANCE = {"lr": (1e-9, 0.0), "grad_norm": (3e-2, 0.0)}
LOSS_TOLERANCE = (5e-4, 5e-5)
LOSS_KEYS = ("loss", "kd_loss", "ce_loss", "valid_loss", "valid_kd_loss")


class _Lcg:
    """32-bit linear congruential generator (Numerical Recipes constants): the same stream on
    every platform and library version."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFF

    def next(self) -> int:
        self.state = (1664525 * self.state + 1013904223) & 0xFFFFFFFF
        return self.state

    def below(self, n: int) -> int:
        return self.next() * n >> 32


def _markov_document(rng: _Lcg, length: int) -> list[int]:
    """A walk on a sparse chain over ids 1..511: each id has four successors, taken with
    probabilities 8/16, 4/16, 3/16, 1/16 (learnable structure; the EOS id 0 never occurs inside)."""
    cut = (8, 12, 15, 16)
    ids = [1 + rng.below(VOCAB - 1)]
    while len(ids) < length:
        r = rng.below(16)
        j = next(i for i, c in enumerate(cut) if r < c)
        ids.append(1 + (ids[-1] * 37 + j * 101 + 7) % (VOCAB - 1))
    return ids


def write_corpora(root: Path) -> dict[str, str]:
    """The synthetic text corpus (300 documents of 12-90 ids, each ending in EOS) and the
    conversations (300 of 10-40 ids: a prompt of the chain, then a reply of the chain ending in
    EOS, the reply's ids the only targets). Returns their prefixes."""
    from kdtrain.data import write_indexed_dataset

    rng = _Lcg(20261206)
    text = [_markov_document(rng, 12 + rng.below(79)) + [EOS] for _ in range(300)]
    chats = []
    for _ in range(300):
        n = 10 + rng.below(31)
        prompt = 3 + rng.below(n - 5)
        ids = _markov_document(rng, n - 1) + [EOS]
        chats.append((ids, [i >= prompt for i in range(n)]))
    prefixes = {"text": str(root / "text"), "chat": str(root / "chat")}
    write_indexed_dataset(prefixes["text"], text, VOCAB, {"eos_id": EOS})
    write_indexed_dataset(prefixes["chat"], chats, VOCAB, {"eos_id": EOS})
    return prefixes


def _jobs(root: Path, prefixes: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    teacher = root / "ckpt-teacher"
    common = ["--config", "tiny", "logging.progress_bar=false"]
    return [
        ("pretrain", "pretrain_gpt.py", [*common, f"data.path=[{prefixes['text']}]", "training.train_steps=30",
                                         "training.eval_interval=15", "optimizer.lr=1e-2", "optimizer.min_lr=1e-3",
                                         "optimizer.warmup_steps=5", f"checkpoint.dir={teacher}"]),
        ("distill", "distill_gpt.py", [*common, f"data.path=[{prefixes['text']}]", f"teacher.load={teacher}",
                                       "teacher.random_init=false", "loss.divergence=jsd", "loss.beta=0.5",
                                       "loss.alpha=0.2", "loss.tau=1.0", "training.train_steps=10",
                                       "training.eval_interval=5"]),
        ("distill-chat", "distill_gpt.py", [*common, f"data.path=[{prefixes['chat']}]", f"teacher.load={teacher}",
                                            "teacher.random_init=false", "loss.tau=1.0", "data.packing=best_fit",
                                            "data.attention=documents", "data.seq_length=64",
                                            "training.global_batch_size=16", "optimizer.lr=1e-3",
                                            "optimizer.min_lr=1e-4", "training.train_steps=8"]),
    ]


def run_golden(root: Path, overrides: dict[str, list[str]] | None = None) -> dict:
    """Run the three jobs under ``root`` (with extra ``overrides`` per run name); return
    {run: {"train": {step: {...}}, "valid": {...}}}."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(root, write_corpora(root / "data"))
    overrides = overrides or {}
    args = [(script, [*a, f"logging.dir={root / name}", *overrides.get(name, [])]) for name, script, a in jobs]
    run_entries(1, args, root / "launch")
    curves = {}
    for name, _, _ in jobs:
        curve = {}
        for kind, keys in (("train", TRAIN_KEYS), ("valid", VALID_KEYS)):
            curve[kind] = {str(step): {k: rec[k] for k in keys if rec.get(k) is not None}
                           for step, rec in sorted(read_metrics(root / name, kind).items())}
        curves[name] = curve
    return curves


def _bound(key: str, want: float) -> float:
    rel, abs_ = TOLERANCE.get(key, LOSS_TOLERANCE)
    return rel * abs(want) + abs_


def worst_ratio(got: dict, want: dict, keys=None) -> float:
    """The largest |got - stored| / tolerance over the numbers both hold (``keys``: only those)."""
    ratios = [abs(got[run][kind][step][key] - w) / _bound(key, w)
              for run, kinds in want.items() for kind, steps in kinds.items() for step, values in steps.items()
              for key, w in values.items() if (keys is None or key in keys)
              and got.get(run, {}).get(kind, {}).get(step, {}).get(key) is not None]
    return max(ratios, default=0.0)


def differences(got: dict, want: dict) -> list[str]:
    """Every recorded number of ``want`` that ``got`` lacks or misses by more than its tolerance,
    and every step ``got`` logged that ``want`` does not hold."""
    out = []
    for run, kinds in want.items():
        for kind, steps in kinds.items():
            for step, values in steps.items():
                for key, w in values.items():
                    g = got.get(run, {}).get(kind, {}).get(step, {}).get(key)
                    if g is None or abs(g - w) > _bound(key, w):
                        out.append(f"{run} {kind} step {step} {key}: got {g}, stored {w}")
    for run, kinds in got.items():
        for kind, steps in kinds.items():
            extra = sorted(set(steps) - set(want.get(run, {}).get(kind, {})), key=int)
            if extra:
                out.append(f"{run} {kind}: steps {extra} not in the stored curves")
    return out


def test_runs_reproduce_the_stored_curves(tmp_path):
    want = json.loads(GOLDEN.read_text())["curves"]
    got = run_golden(tmp_path)
    assert set(got) == set(want)
    # The stored curves are informative: the teacher learns, the students' KD terms are there.
    pre = want["pretrain"]["valid"]
    assert pre["30"]["valid_loss"] < pre["15"]["valid_loss"] - 0.5
    assert {"valid_loss", "valid_kd_loss"} <= set(want["distill"]["valid"]["5"])
    assert all(rec["kd_loss"] > 0.01 for rec in want["distill-chat"]["train"].values())
    bad = differences(got, want)
    assert not bad, (f"{len(bad)} numbers moved beyond their tolerance (if intended, regenerate with "
                     f"`python tests/test_golden.py --write` and say why in the commit):\n" + "\n".join(bad[:20]))


def test_the_comparison_sees_a_small_change():
    """A loss 1e-3 off, a missing record and an extra step are each reported."""
    want = json.loads(GOLDEN.read_text())["curves"]
    got = json.loads(json.dumps(want))
    got["distill"]["train"]["10"]["loss"] *= 1 + 1e-3
    assert differences(got, want) == [f"distill train step 10 loss: got {got['distill']['train']['10']['loss']}, "
                                      f"stored {want['distill']['train']['10']['loss']}"]
    del got["distill"]["valid"]["5"]
    assert any("valid step 5 valid_loss: got None" in d for d in differences(got, want))
    got = json.loads(json.dumps(want))
    got["pretrain"]["train"]["31"] = {"loss": 1.0}
    assert differences(got, want) == ["pretrain train: steps ['31'] not in the stored curves"]


# --sensitivity: (label, environment, overrides per run) beside a plain run on this machine.
VARIANTS = [
    ("kernels: AVX2", {"ATEN_CPU_CAPABILITY": "avx2"}, {}),
    ("kernels: scalar", {"ATEN_CPU_CAPABILITY": "default"}, {}),
    ("lr +1%", {}, {"pretrain": ["optimizer.lr=1.01e-2"], "distill": ["optimizer.lr=3.03e-3"],
                    "distill-chat": ["optimizer.lr=1.01e-3"]}),
    ("clip_grad 1 -> 0.2", {}, {"distill": ["optimizer.clip_grad=0.2"], "distill-chat": ["optimizer.clip_grad=0.2"]}),
    ("tau 1 -> 1.01", {}, {"distill": ["loss.tau=1.01"], "distill-chat": ["loss.tau=1.01"]}),
    ("weight_decay 0.1 -> 0.09", {}, {run: ["optimizer.weight_decay=0.09"]
                                      for run in ("pretrain", "distill", "distill-chat")}),
    ("jsd beta 0.5 -> 0.505", {}, {"distill": ["loss.beta=0.505"]}),
]


def sensitivity(out: Path) -> None:
    """Each variant's largest difference to a plain run, as a multiple of its tolerance."""
    with tempfile.TemporaryDirectory() as tmp:
        base = run_golden(Path(tmp) / "base")
        lines = [f"{'variant':26s} {'losses':>8s} {'grad_norm':>9s}  flagged", "-" * 56]
        stored = json.loads(GOLDEN.read_text())["curves"] if GOLDEN.is_file() else None
        if stored is not None:
            lines.append(f"{'stored curves':26s} {worst_ratio(base, stored, LOSS_KEYS):8.3f} "
                         f"{worst_ratio(base, stored, ('grad_norm',)):9.3f}  "
                         f"{'yes' if differences(base, stored) else 'no'}")
        for i, (label, env, overrides) in enumerate(VARIANTS):
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                got = run_golden(Path(tmp) / f"v{i}", overrides)
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            losses = worst_ratio(got, base, LOSS_KEYS)
            lines.append(f"{label:26s} {losses:8.3f} {worst_ratio(got, base, ('grad_norm',)):9.3f}  "
                         f"{'yes' if differences(got, base) else 'no'}")
            print(lines[-1], flush=True)
    text = ("python tests/test_golden.py --sensitivity " + str(out) + "\n"
            "Largest |variant - plain run| over every step of the three runs, in multiples of the tolerance\n"
            "(losses: KD, CE, total and held-out; 1.0 = the edge); flagged: the comparison reports it.\n\n"
            + "\n".join(lines) + "\n")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/golden/curves.json")
    parser.add_argument("--out", help="also write the curves of this run to this JSON file")
    parser.add_argument("--override", action="append", default=[], metavar="RUN:KEY=VALUE",
                        help="an extra config override for one run (to see what a change moves)")
    parser.add_argument("--sensitivity", metavar="OUT", help="measure kernel variants and small changes against "
                        "the tolerances (about 3 minutes) and write the table to OUT")
    opts = parser.parse_args()
    if opts.sensitivity:
        sensitivity(Path(opts.sensitivity))
        sys.exit(0)
    extra: dict[str, list[str]] = {}
    for o in opts.override:
        name, _, kv = o.partition(":")
        extra.setdefault(name, []).append(kv)
    with tempfile.TemporaryDirectory() as tmp:
        curves = run_golden(Path(tmp), extra)
    if opts.out:
        Path(opts.out).write_text(json.dumps(curves, indent=1) + "\n")
    if opts.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        import datetime

        import megatron.core
        import torch

        written = {"command": "python tests/test_golden.py --write", "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "megatron_core": megatron.core.__version__,
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        GOLDEN.write_text(json.dumps({"written": written, "curves": curves}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    elif GOLDEN.is_file():
        bad = differences(curves, json.loads(GOLDEN.read_text())["curves"])
        print("\n".join(bad) or "matches the stored curves")
