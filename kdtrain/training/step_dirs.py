"""A checkpoint directory's steps: ``step_N`` directories (``.tmp`` while a save fills one,
``.old`` for a copy set aside by a re-save), the ``latest`` file naming the newest complete one,
and pruning (kdtrain/training/checkpoint.py writes and reads the steps themselves)."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def complete_steps(root: Path) -> list[Path]:
    """The step directories under ``root`` that are not a save in progress or a set-aside copy,
    oldest first (by step: from step 10^7 on the names no longer sort)."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.suffix not in (".tmp", ".old")
                   and p.name.removeprefix("step_").isdigit()), key=step_of)


def prune_steps(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints up to the one ``latest`` names; drop the
    debris of interrupted saves (``.tmp``), copies set aside by an interrupted re-save (``.old``)
    and steps newer than ``latest``: a save killed between its rename and the ``latest`` update
    leaves one, the job resumed from an older step, and keeping the newest by number would delete
    the step ``latest`` names. What cannot be deleted (a file system that refuses it) is a warning
    naming it, not an error: the checkpoint just published is complete, but old ones accumulate."""
    failures: list[str] = []
    for debris in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
        _remove(debris, failures)
    committed = step_of(root / (root / "latest").read_text().strip())
    steps = complete_steps(root)
    for old in [p for p in steps if step_of(p) > committed] + [p for p in steps if step_of(p) <= committed][:-keep]:
        _remove(old, failures)
    if failures:
        warnings.warn(f"kdtrain: checkpoint pruning could not delete {len(failures)} path(s) under {root}, first "
                      f"{failures[0]}; older checkpoints stay on disk (checkpoint.keep={keep})", RuntimeWarning,
                      stacklevel=2)


def _remove(path: Path, failures: list[str]) -> None:
    def note(_func, where, error) -> None:
        failures.append(f"{where}: {error}")
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=note)
    else:
        shutil.rmtree(path, onerror=lambda func, where, info: note(func, where, info[1]))


def check_latest_marker(root: str | os.PathLike) -> Path:
    """``root/latest``, refused when it is a directory: taken for absent, it would fail the run's
    first save (the rename onto it), after the training up to it."""
    marker = Path(root) / "latest"
    if marker.is_dir():
        raise ValueError(f"checkpoint dir {root}: {marker} is a directory; kdtrain writes the name of the newest "
                         "step there: move it away")
    return marker


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None if there is none: the step that
    ``latest`` names, or without ``latest`` the newest complete step (a first save killed between
    its rename and writing ``latest``, or step directories copied without it; its meta.json is
    written before the rename): ignored, they would be pruned by the new run's first save."""
    root = Path(root)
    marker = check_latest_marker(root)
    if not marker.is_file():
        done = [p for p in complete_steps(root) if (p / "meta.json").is_file()]
        return done[-1] if done else None
    try:
        named = marker.read_text().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{marker} should name a step directory (step_NNNNNNN) but is not text") from None
    if named in ("", ".", "..") or "/" in named or os.sep in named:  # else the folder itself, or another
        raise ValueError(f"{marker} should name a step directory (step_NNNNNNN) of {root} but holds "
                         f"{'nothing' if not named else repr(named)}")
    path = root / named
    if not (path / "meta.json").is_file():
        aside = path.with_name(path.name + ".old")  # a re-save of that step crashed mid-rename
        if (aside / "meta.json").is_file():
            return aside
        raise ValueError(f"checkpoint dir {root}: 'latest' names {path.name}, which is missing or incomplete")
    return path
