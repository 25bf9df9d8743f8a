"""Settings a run was given that have no effect in it: a value other than the default in a field
that another setting switches off (``loss.beta`` with a divergence other than JSD, ``onpolicy.*``
with ``onpolicy.fraction: 0``, ...). Not errors (a shared YAML may set them for other runs), but
named in the run's log at start, since a user who set one expects it to act."""

from __future__ import annotations

import dataclasses


def _changed(section, names) -> list[str]:
    """The fields of ``section`` among ``names`` whose value is not the default."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    out = []
    for name in names:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(section, name) != default:
            out.append(name)
    return out


def inactive_loss_fields(loss: dict) -> set[str]:
    """Fields of a ``loss`` section (as a dict) that do not change its objective: a resumed run may
    differ in them."""
    out = set()
    if loss.get("divergence") != "jsd":
        out.add("beta")
    if loss.get("tau") == 1.0:
        out.add("scale_by_tau_sq")
    return out


def inactive_optimizer_fields(optimizer: dict) -> set[str]:
    """Fields of an ``optimizer`` section (as a dict) that do not change its schedule."""
    return {"min_lr", "decay_steps"} if optimizer.get("decay_style") == "constant" else set()


def inert_settings(cfg) -> list[str]:
    """``section.field (why)`` for each setting of ``cfg`` (a PretrainConfig or DistillConfig)
    that has no effect in its run."""
    out = []

    def note(section_name: str, section, names, why: str) -> None:
        out.extend(f"{section_name}.{name} ({why})" for name in _changed(section, names))

    opt = cfg.optimizer
    note("optimizer", opt, sorted(inactive_optimizer_fields(dataclasses.asdict(opt))),
         "optimizer.decay_style is constant")
    if not cfg.logging.wandb:
        note("logging", cfg.logging, ("wandb_project", "wandb_entity"), "logging.wandb is off")
    if cfg.checkpoint.dir is None:
        note("checkpoint", cfg.checkpoint, ("save_interval", "keep", "resume"), "checkpoint.dir is not set")
    if cfg.data.split[1] == 0:
        note("training", cfg.training, ("eval_interval", "eval_batches"), "data.split holds out nothing")
    if not hasattr(cfg, "teacher"):  # pretraining
        return out
    if cfg.split.mode == "colocated":  # (auto: the planner prices disaggregated plans with them)
        note("split", cfg.split, ("depth", "teacher_first"), "split.mode is colocated")
    loss = dataclasses.asdict(cfg.loss)
    for name in sorted(inactive_loss_fields(loss)):
        why = f"loss.divergence is {cfg.loss.divergence}" if name == "beta" else "loss.tau is 1"
        note("loss", cfg.loss, (name,), why)
    if cfg.onpolicy.fraction == 0:
        note("onpolicy", cfg.onpolicy, [f.name for f in dataclasses.fields(cfg.onpolicy) if f.name != "fraction"],
             "onpolicy.fraction is 0")
    t = cfg.teacher
    if t.source == "cache":
        note("teacher", t, ("tp", "pp", "dp", "load", "random_init"),
             "teacher.source is cache: no teacher is built")
    return out
