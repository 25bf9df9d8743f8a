"""Settings a run was given that have no effect in it: a value other than the default in a field
that another setting switches off (``loss.beta`` with a divergence other than JSD, ``onpolicy.*``
with ``onpolicy.fraction: 0``, ...). Not errors (a shared YAML may set them for other runs), but
named in the run's log at start, since a user who set one expects it to act."""

from __future__ import annotations

import dataclasses


def _changed(section, *names: str) -> list[str]:
    """The fields of ``section`` among ``names`` (all when none) whose value is not the default."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    out = []
    for name in names or tuple(fields):
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(section, name) != default:
            out.append(name)
    return out


def inert_settings(cfg) -> list[str]:
    """``section.field (why)`` for each setting of ``cfg`` (a PretrainConfig or DistillConfig)
    that has no effect in its run."""
    out = []

    def note(section_name: str, section, names, why: str) -> None:
        out.extend(f"{section_name}.{name} ({why})" for name in _changed(section, *names))

    opt = cfg.optimizer
    if opt.decay_style == "constant":
        note("optimizer", opt, ("min_lr", "decay_steps"), "optimizer.decay_style is constant")
    if not cfg.logging.wandb:
        note("logging", cfg.logging, ("wandb_project", "wandb_entity"), "logging.wandb is off")
    if not hasattr(cfg, "teacher"):  # pretraining
        return out
    if cfg.split.mode == "colocated":
        note("split", cfg.split, ("depth", "teacher_first"), "split.mode is colocated")
    if cfg.loss.divergence != "jsd":
        note("loss", cfg.loss, ("beta",), f"loss.divergence is {cfg.loss.divergence}")
    if cfg.onpolicy.fraction == 0:
        note("onpolicy", cfg.onpolicy, tuple(n for n in _changed(cfg.onpolicy) if n != "fraction"),
             "onpolicy.fraction is 0")
    t = cfg.teacher
    if t.source == "cache":
        note("teacher", t, ("tp", "pp", "dp", "load"),
             "teacher.source is cache: no teacher is built")
    return out
