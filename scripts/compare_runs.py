"""Final held-out loss of finished runs side by side (reads each run's metrics.jsonl).

    python scripts/compare_runs.py runs/demo-teacher runs/demo-distill runs/demo-student-scratch

For each run directory: the last step trained, the last training loss and the held-out
(validation) loss and perplexity at that step. Runs are listed in the order given.
"""

import argparse
import json
import math
import sys
from pathlib import Path


def final_metrics(run_dir: Path) -> dict:
    """Last training and validation records of a run (a resumed run's re-logged steps: last wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics (is {run_dir} a finished run directory?)")
    last = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        kind = rec.get("kind")
        if kind in ("train", "valid") and rec["step"] >= last.get(kind, {}).get("step", -1):
            last[kind] = rec
    if "valid" not in last:
        raise ValueError(f"{path}: no validation record (training.eval_batches > 0 is needed)")
    return {"step": last.get("train", last["valid"])["step"], "train_loss": last.get("train", {}).get("loss"),
            "valid_step": last["valid"]["step"], "valid_loss": last["valid"]["valid_loss"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (logging.dir of each run)")
    args = parser.parse_args(argv)
    try:
        rows = [(r, final_metrics(Path(r))) for r in args.runs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(r) for r, _ in rows)
    print(f"{'run':<{width}}  {'steps':>5}  {'train loss':>10}  {'held-out loss':>13}  {'held-out ppl':>12}")
    for r, m in rows:
        train = f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"
        print(f"{r:<{width}}  {m['step']:>5}  {train:>10}  {m['valid_loss']:>13.4f}  "
              f"{math.exp(min(m['valid_loss'], 50)):>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
