"""Run logging (kdtrain/training/logger.py): a job that resumes a run directory appends to the same
metrics file and continues the same wandb run (offline here: no project, no key); a job that
raises closes its logger as failed."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from conftest import REPO
from kdtrain.config.run import LoggingConfig
from kdtrain.training.logger import RunLogger


def test_a_resumed_job_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = LoggingConfig(dir=str(tmp_path / "run"), progress_bar=False, tensorboard=False, wandb=True)
    ids = []
    for step in (1, 2):  # two jobs: the second resumes after step 1
        logger = RunLogger(cfg, True, total_steps=2, start_step=step - 1, run_config={"x": 1}, name="run")
        logger.log(step, {"loss": 1.0 / step})
        ids.append(logger.wandb.id)
        logger.close()
    assert ids[0] == ids[1] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    # `wandb sync` joins them (two jobs within one second get the directory name with a "-1")
    assert len(offline) == 2 and all(re.fullmatch(rf"offline-run-\d+_\d+-{ids[0]}(-\d+)?", n) for n in offline), offline
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    other = RunLogger(LoggingConfig(dir=str(tmp_path / "other"), progress_bar=False, tensorboard=False, wandb=True),
                      True, total_steps=1, start_step=0, name="other")
    assert other.wandb.id != ids[0]  # another run directory, another run
    other.close()


def test_wandb_mode_from_the_environment_decides(tmp_path, monkeypatch):
    """WANDB_MODE=disabled writes no wandb files (the logger's own offline mode overrode it)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = LoggingConfig(dir=str(tmp_path / "run"), progress_bar=False, tensorboard=False, wandb=True)
    logger = RunLogger(cfg, True, total_steps=1, start_step=0, name="run")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not list((tmp_path / "run").glob("wandb/*run-*"))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_line_torn_by_a_crash_is_dropped_when_the_job_resumes(tmp_path):
    """A job killed mid-write (or on a full disk) left half a metrics line; the resumed job's first
    line joined it, and the file stayed unreadable (compare_runs refused the run)."""
    cfg = LoggingConfig(dir=str(tmp_path), progress_bar=False, tensorboard=False, wandb=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    logger = RunLogger(cfg, True, total_steps=3, start_step=1)
    logger.log(2, {"loss": 0.5})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')  # no complete line at all
    RunLogger(cfg, True, total_steps=3, start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_job_that_raises_closes_its_logger_as_failed(world_of_one, tiny_corpus, tmp_path, monkeypatch, capsys):
    """pretrain and distill close the run's sinks (metrics file, TensorBoard, wandb) on the way out
    of an exception too, with wandb told the run failed (and distill its teacher cache's reader,
    whose prefetch thread would otherwise keep the reader alive, and the profiler recording, by
    the same ExitStack)."""
    from kdtrain.config import load_pretrain_config
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training import distill as distill_mod
    from kdtrain.training import pretrain as pretrain_mod

    closed = []
    real_close = RunLogger.close
    monkeypatch.setattr(RunLogger, "close",
                        lambda self, failed=False: (closed.append(failed), real_close(self, failed)))
    data = [f"data.path=[{tiny_corpus['prefix']}]", f"data.tokenizer={tiny_corpus['tokenizer']}",
            "training.train_steps=2", "training.eval_batches=0", "precision.device=cpu", "logging.progress_bar=false"]
    real_step = pretrain_mod.train_step

    def second_step_fails(*args, **kwargs):
        if second_step_fails.calls == 1:
            raise RuntimeError("injected")
        second_step_fails.calls += 1
        return real_step(*args, **kwargs)

    for name, mod, load, run in (("pretrain", pretrain_mod, load_pretrain_config, pretrain_mod.pretrain),
                                 ("distill", distill_mod, load_distill_config, distill_mod.distill)):
        cfg = load("tiny", [*data, f"logging.dir={tmp_path / name}", "logging.wandb_entity=team"])
        run(cfg)
        # A setting that does nothing in the run is named at its start (kdtrain/config/inert.py).
        assert "settings with no effect in this run: logging.wandb_entity (logging.wandb is off)" \
            in capsys.readouterr().out, name
        second_step_fails.calls = 0
        monkeypatch.setattr(mod, "train_step", second_step_fails)
        with pytest.raises(RuntimeError, match="injected"):  # inside the profiled window: recording stops too
            run(load("tiny", [*data, f"logging.dir={tmp_path / name}-failed", "logging.profile_steps=[1,2]"]))
        assert not torch.autograd.profiler._is_profiler_enabled, name
        assert closed == [False, True], (name, closed)
        closed.clear()
        steps = [json.loads(line)["step"] for line in (tmp_path / f"{name}-failed" / "metrics.jsonl").open()]
        assert steps == [1], (name, steps)


class _FailingWandb:
    """A wandb whose init fails (no network, a bad entity)."""

    @staticmethod
    def init(**kwargs):
        raise ConnectionError("wandb.init: network unreachable")


def _start_with_failing_wandb(rank, world, tmp):
    import sys
    from pathlib import Path

    from kdtrain.training.logger import start_logger

    sys.modules["wandb"] = _FailingWandb
    cfg = LoggingConfig(dir=str(Path(tmp) / "run"), progress_bar=False, tensorboard=True, wandb=True)
    try:
        start_logger(cfg, rank == 0, 4, 0)
        said = "started"
    except Exception as e:  # noqa: BLE001
        said = f"{type(e).__name__}: {e}"
    (Path(tmp) / f"said{rank}.txt").write_text(said)


def test_a_sink_that_fails_to_open_stops_every_rank_and_closes_the_others(tmp_path, monkeypatch):
    """wandb.init failing on the writing rank: the metrics file and TensorBoard writer it had
    opened are closed, and every rank raises (the others waited in their first collective until
    the job's timeout)."""
    import sys

    from conftest import run_spawn

    closed = []

    class Writer:
        def __init__(self, log_dir):
            pass

        def close(self):
            closed.append("tensorboard")

    import torch.utils.tensorboard

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Writer)
    monkeypatch.setitem(sys.modules, "wandb", _FailingWandb)
    cfg = LoggingConfig(dir=str(tmp_path / "one"), progress_bar=False, tensorboard=True, wandb=True)
    with pytest.raises(ConnectionError, match="network unreachable"):
        RunLogger(cfg, True, 4, 0)
    assert closed == ["tensorboard"]

    run_spawn(2, _start_with_failing_wandb, str(tmp_path), tmp_path=tmp_path)
    assert (tmp_path / "said0.txt").read_text() == "ConnectionError: wandb.init: network unreachable"
    assert (tmp_path / "said1.txt").read_text() == (
        f"PeerFailed: rank 0 could not open the run's logs in {tmp_path / 'run'}: "
        "ConnectionError('wandb.init: network unreachable')")


def test_compare_runs_names_file_and_line_of_a_malformed_metrics_file(tmp_path, capsys):
    """scripts/compare_runs.py: a metrics line that is JSON but not an object, a train record without
    its step, or bytes that are not UTF-8 text are an ``error: FILE:LINE: ...`` line and exit 2, not
    an AttributeError, KeyError or a decode error without the file."""
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    good = ['{"kind": "train", "step": 1, "loss": 2.5}', '{"kind": "valid", "step": 1}',  # no held-out window
            '{"kind": "valid", "step": 1, "valid_loss": 2.0}']
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "metrics.jsonl").write_text("\n".join(good) + "\n")
    assert compare_runs.main([str(tmp_path / "good")]) == 0
    assert "2.5000" in capsys.readouterr().out
    for name, lines, message in (("list", [good[0], "[1, 2]"], ":2: not a JSON object, got list"),
                                 ("nostep", [good[2], '{"kind": "train", "loss": 1.0}'],
                                  ":2: train record without an integer step, got None"),
                                 ("loss", [good[0], '{"kind": "valid", "step": 2, "valid_loss": "low"}'],
                                  ":2: valid record's valid_loss is not a number, got 'low'"),
                                 ("binary", [good[0], good[2], b"\xff\xfe\x00\x81"], ":3: not UTF-8 text")):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "metrics.jsonl"
        path.write_bytes(b"\n".join(ln if isinstance(ln, bytes) else ln.encode() for ln in lines) + b"\n")
        with pytest.raises(ValueError, match=re.escape(f"{path}{message}")):
            compare_runs.final_metrics(tmp_path / name)
        assert compare_runs.main([str(tmp_path / "good"), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}{message}") and "Traceback" not in err, err
