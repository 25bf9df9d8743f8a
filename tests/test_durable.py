"""Scratch files of killed writers (kdtrain/durable.py ``reap_scratch``): the next writer removes
them on its host, never a running writer's nor another host's (or container's); an HF export killed between the
renames of its swap gets the earlier export back; a corpus writer clears a killed one's tokens."""

from __future__ import annotations

import os
import subprocess
import sys

from kdtrain.durable import _host, dead_scratch, reap_scratch


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_this_host_s_dead_writers_scratch_is_reaped(tmp_path):
    host, dead, live = _host(), _dead_pid(), os.getppid()
    names = {f"x.tmp-{dead}@{host}.bin": True, f"x.tmp-{dead}@{host}.loss_mask.bin": True,
             f"x.tmp-{live}@{host}.bin": False,  # running
             f"x.tmp-{dead}@{host}.other.bin": False,  # a host named `{host}.other`
             f"x.tmp-{dead}@{host.split(':')[0]}:1.bin": False,  # a container of this host's name
             f"x.tmp-{dead}@{host}x.idx": False, f"x.tmp-{dead}.bin": False,  # untagged (an older release)
             f"y.tmp-{dead}@{host}.bin": False, "x.bin": False}
    for name in names:
        (tmp_path / name).write_text("")
    (tmp_path / f".out.export-{dead}@{host}").mkdir()
    (tmp_path / f".out.export-{dead}@{host}" / "model.safetensors").write_text("")
    suffixes = (".bin", ".idx", ".meta.json", ".loss_mask.bin")
    dead_ones = sorted(n for n, d in names.items() if d)
    assert sorted(p.name for p in dead_scratch(tmp_path, "x.tmp-", suffixes)) == dead_ones
    reap_scratch(tmp_path, "x.tmp-", suffixes)
    reap_scratch(tmp_path, ".out.export-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, d in names.items() if not d)


def test_an_export_killed_mid_swap_is_recovered(tmp_path):
    from kdtrain.convert.hf_export import EXPORT_MARKER, _recover

    host, dead = _host(), _dead_pid()
    out = tmp_path / "hf"
    old, stage = tmp_path / f".hf.old-{dead}@{host}", tmp_path / f".hf.export-{dead}@{host}"
    for d in (old, stage):
        d.mkdir()
        (d / EXPORT_MARKER).write_text(d.name)
    _recover(out)  # killed between the renames: out moved aside, the new export not in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / EXPORT_MARKER).read_text() == old.name
    old.mkdir()
    _recover(out)  # killed after the swap, before the old export was removed: stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / EXPORT_MARKER).read_text() == old.name


def test_a_corpus_writer_removes_a_killed_writer_s_tokens(tmp_path):
    from kdtrain.data.indexed import open_indexed_dataset, write_indexed_dataset

    host, dead, live = _host(), _dead_pid(), os.getppid()
    killed = [tmp_path / f"text.tmp-{dead}@{host}{ext}" for ext in (".bin", ".idx", ".loss_mask.bin")]
    running = tmp_path / f"text.tmp-{live}@{host}.bin"
    for p in (*killed, running):
        p.write_bytes(b"\0" * 64)
    write_indexed_dataset(str(tmp_path / "text"), [[1, 2, 3], [4, 5]], 16, {})
    assert not any(p.exists() for p in killed) and running.exists()
    ds = open_indexed_dataset(str(tmp_path / "text"))
    assert ds.num_documents == 2 and ds.num_tokens == 5


def test_an_export_interrupted_between_its_renames_puts_the_earlier_one_back(tmp_path, monkeypatch):
    import pytest

    import kdtrain.convert.hf_export as hf_export

    out, stage = tmp_path / "hf", tmp_path / "stage"
    for d, text in ((out, "earlier"), (stage, "new")):
        d.mkdir()
        (d / hf_export.EXPORT_MARKER).write_text(text)
    real, calls = os.replace, []

    def interrupted(src, dst):  # the Ctrl-C lands after `out` went aside, before `stage` took its name
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(hf_export.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf_export._replace_dir(out, stage)
    monkeypatch.undo()
    assert (out / hf_export.EXPORT_MARKER).read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "stage"]


def test_an_export_syncs_every_staged_file_before_it_is_published(tmp_path, monkeypatch):
    """safetensors and shutil write without syncing: a rename of the staging directory could
    publish empty or cut files after a machine crash unless each is synced first."""
    import kdtrain.convert.hf_export as hf_export
    import kdtrain.durable as durable

    events, real_sync, real_replace = [], durable.fsync_file, os.replace
    monkeypatch.setattr(durable, "fsync_file", lambda p: (events.append(("sync", os.fspath(p))), real_sync(p)))
    monkeypatch.setattr(hf_export.os, "replace", lambda a, b: (events.append(("rename", os.fspath(a))),
                                                                 real_replace(a, b)))
    (tmp_path / "hf" / "notes").mkdir(parents=True)  # a user's files in the export directory
    (tmp_path / "hf" / "notes" / "README.md").write_text("mine")
    for i in range(2):  # over the user's directory, then over that export
        stage = tmp_path / f"stage{i}"
        stage.mkdir()
        files = [stage / "model.safetensors", stage / "config.json"]
        for f in files:
            f.write_text("x")
        events.clear()
        hf_export._replace_dir(tmp_path / "hf", stage)
        published = events.index(("rename", str(stage)))
        synced = {p for kind, p in events[:published] if kind == "sync"}
        assert synced == {str(f) for f in files} | {str(stage / "notes" / "README.md")}, (i, events)
    assert (tmp_path / "hf" / "notes" / "README.md").read_text() == "mine"
