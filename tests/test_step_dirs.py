"""A checkpoint directory's steps (kdtrain/training/step_dirs.py) without a model: pruning."""

import os

import pytest

from kdtrain.training.step_dirs import complete_steps, prune_steps, step_name


def _steps(root, steps, latest):
    for step in steps:
        (root / step_name(step)).mkdir(parents=True)
        (root / step_name(step) / "meta.json").write_text("{}")
    (root / "latest").write_text(step_name(latest))


def test_pruning_that_cannot_delete_warns_naming_the_path_and_prunes_the_rest(tmp_path, monkeypatch):
    """A file system refusing a delete left old checkpoints accumulating with no word (errors
    were ignored); the save itself stands."""
    _steps(tmp_path, (1, 2, 3, 4), latest=4)
    (tmp_path / step_name(1) / "held").write_text("x")
    (tmp_path / "step_0000005.tmp").mkdir()
    unlink = os.unlink

    def refuse(path, *a, **kw):
        if os.fspath(path).endswith("held"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.warns(RuntimeWarning, match=r"could not delete 2 path\(s\) under .*held: .*Permission denied"
                                            r".*checkpoint.keep=2"):
        prune_steps(tmp_path, keep=2)
    assert [p.name for p in complete_steps(tmp_path)] == [step_name(1), step_name(3), step_name(4)]
    assert (tmp_path / step_name(1) / "held").exists() and not (tmp_path / step_name(1) / "meta.json").exists()
    assert not (tmp_path / "step_0000005.tmp").exists()

    monkeypatch.setattr(os, "unlink", unlink)  # the next save's pruning takes it
    prune_steps(tmp_path, keep=2)
    assert [p.name for p in complete_steps(tmp_path)] == [step_name(3), step_name(4)]
