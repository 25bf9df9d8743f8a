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


def _is_number(v, types) -> bool:
    return isinstance(v, types) and not isinstance(v, bool)


def final_metrics(run_dir: Path) -> dict:
    """Last training and validation records of a run (a resumed run's re-logged steps: last wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics (is {run_dir} a finished run directory?)")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    last = {}
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{n}: not UTF-8 text (is it a metrics file?)") from None
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: not a JSON object, got {type(rec).__name__}")
        kind = rec.get("kind")
        loss = {"train": "loss", "valid": "valid_loss"}.get(kind)
        if loss is None or (kind == "valid" and loss not in rec):  # an evaluation with no held-out window
            continue
        if not _is_number(rec.get("step"), int):
            raise ValueError(f"{path}:{n}: {kind} record without an integer step, got {rec.get('step')!r}")
        if (kind == "valid" or rec.get(loss) is not None) and not _is_number(rec.get(loss), (int, float)):
            raise ValueError(f"{path}:{n}: {kind} record's {loss} is not a number, got {rec.get(loss)!r}")
        if rec["step"] >= last.get(kind, {}).get("step", -1):
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
