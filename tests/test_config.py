"""Config loading and validation: every shipped config loads; user errors name the field."""

import os
import re
from pathlib import Path

import pytest

from kdtrain.config import (
    ModelConfig,
    PretrainConfig,
    apply_overrides,
    from_dict,
    load_model_config,
    load_pretrain_config,
)
from kdtrain.config.loader import CONFIG_DIR

MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
RUN_CONFIGS = sorted((CONFIG_DIR / "pretrain").glob("*.yaml"))
DISTILL_CONFIGS = sorted((CONFIG_DIR / "distill").glob("*.yaml"))


def test_expected_model_configs_ship():
    for name in ("tiny", "demo-teacher", "demo-student", "gpt2-124m", "llama-3.2-1b", "llama-3.1-8b",
                 "qwen2.5-0.5b", "qwen2.5-7b"):
        assert name in MODEL_CONFIGS


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_loads(name):
    m = load_model_config(name)
    assert m.name == name
    assert m.num_attention_heads % m.num_query_groups == 0
    assert m.padded_vocab_size(8) % (128 * 8) == 0 and m.padded_vocab_size(8) >= m.vocab_size


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_run_config_loads(path):
    cfg = load_pretrain_config(str(path))
    assert isinstance(cfg, PretrainConfig)
    world = cfg.parallel.tp * cfg.parallel.pp * (cfg.parallel.dp or 1)
    cfg.validate(world)


@pytest.mark.parametrize("path", DISTILL_CONFIGS, ids=lambda p: p.stem)
def test_every_distill_config_validates_for_its_documented_commands(path):
    """Each torchrun command in a distill config's header (with its overrides) passes validation
    at its --nproc_per_node, so the documented commands do not fail on a config error."""
    from kdtrain.config.distill import load_distill_config

    header = "\n".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    commands = re.findall(r"torchrun (?:--standalone )?--nproc_per_node=(\d+) scripts/distill_gpt\.py "
                          r"--config \S+((?:[ \t]+\\?\n?[ \t]*[\w.]+=\S+)*)", header)
    assert commands, f"{path.name}: no documented torchrun command"
    for world, overrides in commands:
        cfg = load_distill_config(str(path), overrides.replace("\\", " ").split())
        spans = cfg.validate(int(world))
        assert spans.teacher.dp >= 1 and spans.student.dp >= 1


@pytest.mark.parametrize("name,expected", [
    # published parameter counts (real vocabulary, no padding)
    ("gpt2-124m", 124_439_808),
    ("llama-3.2-1b", 1_235_814_400),
    ("llama-3.1-8b", 8_030_261_248),
])
def test_parameter_counts_match_published_sizes(name, expected):
    assert load_model_config(name).num_params() == expected


def _tiny_run(**sections):
    raw = {"model": "tiny", "data": {"path": ["x"], "seq_length": 64}}
    raw.update(sections)
    raw["model"] = load_model_config(raw["model"]) if isinstance(raw["model"], str) else from_dict(ModelConfig, raw["model"], "model")
    return from_dict(PretrainConfig, raw)


@pytest.mark.parametrize("overrides,world,field", [
    ({"parallel": {"tp": 3}}, 3, "parallel.tp"),  # 3 does not divide 4 heads
    ({"parallel": {"pp": 3}}, 3, "parallel.pp"),  # 3 does not divide 4 layers
    ({"parallel": {"tp": 2, "dp": 3}}, 4, "parallel.dp"),  # 2*1*3 != 4
    ({"parallel": {"tp": 2}}, 3, "parallel.tp"),  # 2 does not divide a world of 3
    ({"parallel": {"pp": 2}}, 1, "parallel.pp"),
    ({"data": {"path": ["corpora/web", "corpora/./web"]}}, 1, "data.path: corpora/./web is listed twice"),
    ({"data": {"path": ["web", os.path.abspath("web")]}}, 1, "is listed twice"),
    ({"data": {"path": ["x"], "seq_length": 4096}}, 1, "data.seq_length"),  # above max_seq_length
    ({"training": {"micro_batch_size": 4, "global_batch_size": 12}}, 2, "training.global_batch_size"),
    ({"training": {"exit_interval": 4}}, 1, "training.exit_interval"),  # stopping early without checkpoint.dir
    # stopping early where the same command would start again from step 0
    ({"training": {"exit_interval": 4}, "checkpoint": {"dir": "ck", "resume": False}}, 1, "training.exit_interval"),
    ({"training": {"exit_signal": "SIGTERM"}}, 1, "training.exit_signal: stopping early needs checkpoint.dir"),
    ({"training": {"exit_duration_min": 230.0}, "checkpoint": {"dir": "ck", "resume": False}}, 1,
     "training.exit_duration_min: stopping early needs checkpoint.resume"),
    # a profile that would never be written
    ({"training": {"train_steps": 10}, "logging": {"profile_steps": [8, 12]}}, 1, "logging.profile_steps"),
])
def test_impossible_layouts_name_the_field(overrides, world, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _tiny_run(**overrides).validate(world)


def test_query_groups_must_divide_heads():
    raw = {"name": "bad", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 3,
           "ffn_hidden_size": 128, "vocab_size": 100, "max_seq_length": 32}
    with pytest.raises(ValueError, match=r"model\.num_query_groups"):
        from_dict(ModelConfig, raw, "model")


def test_tp_must_divide_query_groups():
    m = load_model_config({"name": "gqa", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                           "num_query_groups": 1, "ffn_hidden_size": 128, "vocab_size": 100, "max_seq_length": 32})
    with pytest.raises(ValueError, match=r"parallel\.tp.*num_query_groups"):
        m.check_layout(tp=2, pp=1)


def test_unknown_keys_are_rejected_with_their_path(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\noptimizer: {lr: 1.0e-3, lr_warmup: 5}\n")
    with pytest.raises(ValueError, match=r"optimizer\.lr_warmup: unknown key"):
        load_pretrain_config(str(f))
    f.write_text("model: tiny\ndata: {path: [x]}\ntrainng: {}\n")
    with pytest.raises(ValueError, match=r"trainng: unknown key"):
        load_pretrain_config(str(f))


def test_bad_values_name_the_field(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\n")
    with pytest.raises(ValueError, match=r"optimizer\.lr: expected a number"):
        load_pretrain_config(str(f), ["optimizer.lr=fast"])
    with pytest.raises(ValueError, match=r"model\.activation"):
        load_pretrain_config(str(f), ["model.activation=relu6"])
    with pytest.raises(ValueError, match=r"training\.micro_batch_size: expected an integer"):
        load_pretrain_config(str(f), ["training.micro_batch_size=2.5"])
    with pytest.raises(ValueError, match="unknown models config 'nope'"):
        load_pretrain_config(str(f), ["model=nope"])
    with pytest.raises(ValueError, match=r"training\.exit_interval: must be >= 1"):
        load_pretrain_config(str(f), ["training.exit_interval=0"])
    with pytest.raises(ValueError, match=r"training\.exit_signal: 'SIGKILL' is not a signal a run can stop on"):
        load_pretrain_config(str(f), ["training.exit_signal=SIGKILL"])
    for bad in ("0", "-5", "nan", "soon", "true"):
        with pytest.raises(ValueError, match=r"training\.exit_duration_min: "):
            load_pretrain_config(str(f), [f"training.exit_duration_min={bad}"])
    assert load_pretrain_config(str(f), ["training.exit_duration_min=230"]).training.exit_duration_min == 230
    # A config of the other kind is named as such ('teacher: required section is missing' before).
    from kdtrain.config.distill import load_distill_config

    with pytest.raises(ValueError, match=r"run\.yaml: a pretraining config .* run it with scripts/pretrain_gpt\.py"):
        load_distill_config(str(f))
    with pytest.raises(ValueError, match=r"a distillation config .* run it with scripts/distill_gpt\.py"):
        load_pretrain_config("configs/distill/tiny.yaml")
    # A model config as --config, a role written as a model name, a key YAML read as a boolean
    # ('required section is missing', 'training.True: unknown key' or a TypeError before).
    for load, names in ((load_distill_config, "teacher.model or student.model"), (load_pretrain_config, "model")):
        with pytest.raises(ValueError, match=rf"tiny\.yaml: a model config .* run config's {names}$"):
            load("configs/models/tiny.yaml")
    with pytest.raises(ValueError, match=r"student: expected a section .*, got 'tiny' \(for a model name write "
                                         r"student: \{model: tiny\}, or the override student\.model=tiny\)"):
        load_distill_config("tiny", ["student=tiny"])
    keys = tmp_path / "keys.yaml"
    for extra, key in (("training: {on: true, seed: 1}", "training.True"), ("1: 2", "1")):
        keys.write_text(f.read_text() + extra + "\n")
        with pytest.raises(ValueError, match=rf"{key}: a key must be a name, YAML read this one as a"):
            load_pretrain_config(str(keys))
    # Seeds torch and numpy both take (an OverflowError naming nothing at the first step, or a
    # negative training seed accepted while the data seed's was refused by the dataset).
    for section in ("training", "data"):
        for seed in ("-1", str(2**64)):
            with pytest.raises(ValueError, match=rf"{section}\.seed: must be in \[0, 2\*\*63\), got {seed}"):
                load_pretrain_config(str(f), [f"{section}.seed={seed}"])


@pytest.mark.parametrize("override,field", [
    ("optimizer.decay_steps=5", "optimizer.decay_steps"),  # with warmup_steps=5: nothing left to decay over
    ("optimizer.decay_steps=-1", "optimizer.decay_steps"),
    ("optimizer.eps=0", "optimizer.eps"),
    ("optimizer.clip_grad=-1", "optimizer.clip_grad"),
    ("distributed.timeout_s=0", "distributed.timeout_s"),
    ("logging.peak_tflops=-989", "logging.peak_tflops"),
    ("model.rope_theta=0", "model.rope_theta"),
    ("model.rope_scaling_factor=-8", "model.rope_scaling_factor"),
    ("model.norm_epsilon=-1e-5", "model.norm_epsilon"),
])
def test_out_of_range_values_name_the_field(tmp_path, override, field):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\noptimizer: {warmup_steps: 5}\n")
    load_pretrain_config(str(f), ["optimizer.decay_steps=6"])  # the first step after warm-up decays
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ": "):
        load_pretrain_config(str(f), [override])


@pytest.mark.parametrize("overrides,field", [
    # the same initial weights given twice
    (["student.load=a", "checkpoint.load=b"], "student.load"),
    # a run's teachers send logits and the tail's log-mass
    (["loss.values_are_logprobs=true"], "loss.values_are_logprobs"),
    # a token id excluded from the KD and CE terms but not from the held-out losses
    (["loss.ignore_index=2"], "loss.ignore_index"),
    # the world group's timeout would end a stalled transfer before the stream's
    (["split.timeout_s=900", "distributed.timeout_s=600"], "split.timeout_s"),
    (["training.exit_interval=2", "checkpoint.dir=ck", "checkpoint.resume=false"], "training.exit_interval"),
])
def test_distill_cross_section_errors_name_the_field(overrides, field):
    from kdtrain.config.distill import load_distill_config

    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ": "):
        load_distill_config("tiny", overrides).validate(2)


def test_overrides_reach_nested_fields_and_named_models(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x], seq_length: 32}\n")
    cfg = load_pretrain_config(str(f), ["optimizer.lr=3e-4", "model.num_layers=2", "parallel.tp=2"])
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.model.num_layers == 2 and cfg.model.name == "tiny" and cfg.model.hidden_size == 64
    assert cfg.parallel.tp == 2
    raw = {"a": {"b": 1}}
    apply_overrides(raw, ["a.c.d=[1, 2]"])
    assert raw == {"a": {"b": 1, "c": {"d": [1, 2]}}}


def test_distill_overrides_reach_each_role_model():
    from kdtrain.config.distill import load_distill_config

    cfg = load_distill_config("tiny", ["teacher.model.num_layers=4", "student.model=demo-student",
                                       "student.model.hidden_size=64", "student.model.ffn_hidden_size=176"])
    assert (cfg.teacher.model.name, cfg.teacher.model.num_layers, cfg.teacher.model.hidden_size) == ("tiny", 4, 64)
    assert (cfg.student.model.name, cfg.student.model.hidden_size, cfg.student.model.num_layers) == ("demo-student", 64, 2)
    with pytest.raises(ValueError, match="student.model.hidden_sise"):
        load_distill_config("tiny", ["student.model.hidden_sise=64"])
    with pytest.raises(ValueError, match=r"training\.exit_interval: stopping early needs checkpoint\.dir"):
        load_distill_config("tiny", ["training.exit_interval=2"]).validate(2)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config file not found|unknown pretrain config"):
        load_pretrain_config(str(tmp_path / "missing.yaml"))


def test_slurm_launcher_names_its_entry_points():
    """scripts/slurm_launch.sh: valid shell, and an unknown entry point is refused before Slurm is asked."""
    import subprocess

    script = CONFIG_DIR.parent / "scripts" / "slurm_launch.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "train.py", "configs/distill/tiny.yaml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "ENTRY must be pretrain_gpt.py, distill_gpt.py or cache_teacher.py" in proc.stderr
    header = script.read_text()
    for entry in ("pretrain_gpt.py", "distill_gpt.py", "cache_teacher.py"):
        assert f"slurm_launch.sh {entry} configs/" in header and (CONFIG_DIR.parent / "scripts" / entry).is_file()


def test_a_cache_runs_teacher_layout_constrains_nothing():
    """With teacher.source: cache no teacher is built: the tp/pp/dp of the job that wrote the cache
    (kept in a shared config) do not have to fit the student's world."""
    from kdtrain.config.distill import load_distill_config

    cached = ["teacher.source=cache", "teacher.cache=c", "teacher.tp=4", "teacher.dp=1"]
    with pytest.raises(ValueError, match=r"teacher\.(tp|dp)"):
        load_distill_config("tiny", cached[2:]).validate(2)
    spans = load_distill_config("tiny", cached + ["student.tp=2"]).validate(2)
    assert (spans.teacher.tp, spans.teacher.pp, spans.teacher.dp) == (spans.student.tp, spans.student.pp,
                                                                     spans.student.dp) == (2, 1, 1)
    with pytest.raises(ValueError, match=r"teacher\.cache: source: cache reads a teacher cache: give its directory "
                                         r"\(teacher\.cache=DIR"):
        load_distill_config("tiny", ["teacher.source=cache"])
    with pytest.raises(ValueError, match=r"teacher\.cache: c is read with source: cache or mixed"):
        load_distill_config("tiny", ["teacher.cache=c"])


def test_a_key_written_twice_is_refused(tmp_path):
    """Plain YAML keeps the second ``optimizer:`` and drops the first without a word."""
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\noptimizer: {lr: 1.0e-3}\ntraining: {}\noptimizer: {}\n")
    with pytest.raises(ValueError, match=r"run\.yaml: not valid YAML.*'optimizer' appears twice"):
        load_pretrain_config(str(f))


def test_string_fields_take_an_overrides_text_and_refuse_a_files_number(tmp_path):
    """YAML reads `0100` as octal 64 and `off` as False: a string field takes an override's text as
    typed, and a file's unquoted number or boolean is an error asking for quotes (what was meant is
    not known); number fields still read overrides as numbers."""
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\n")
    cfg = load_pretrain_config(str(f), ["checkpoint.dir=0100", "logging.dir=off", "model.name=1.10",
                                        "training.train_steps=0x10", "optimizer.lr=1e-3"])
    assert (cfg.checkpoint.dir, cfg.logging.dir, cfg.model.name) == ("0100", "off", "1.10")
    assert cfg.training.train_steps == 16 and cfg.optimizer.lr == pytest.approx(1e-3)
    f.write_text("model: tiny\ndata: {path: [x]}\nlogging: {dir: off}\n")
    with pytest.raises(ValueError, match=r"logging\.dir: expected a string, got False .*quote it"):
        load_pretrain_config(str(f))


def test_an_empty_value_is_not_the_text_none(tmp_path):
    """`logging.dir=` (or `dir:` with nothing after it in a file) is an error naming the field: it
    wrote the run's files into ./None; an empty optional field still means None."""
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\n")
    for override, field in (("logging.dir=", r"logging\.dir"), ("data.path=", r"data\.path"),
                            ("model.name=", r"model\.name")):
        with pytest.raises(ValueError, match=field + r": must be set \(the value is empty\)"):
            load_pretrain_config(str(f), [override])
    f.write_text("model: tiny\ndata: {path: [x]}\nlogging:\n  dir:\n")
    with pytest.raises(ValueError, match=r"logging\.dir: must be set"):
        load_pretrain_config(str(f))
    f.write_text("model: tiny\ndata: {path: [x]}\n")
    assert load_pretrain_config(str(f), ["checkpoint.dir="]).checkpoint.dir is None
    f.write_bytes(b"model: tiny\n\xff\n")
    with pytest.raises(ValueError, match=r"run\.yaml: not UTF-8 text \(byte 12\)"):
        load_pretrain_config(str(f))


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=.inf", r"optimizer\.lr: expected a finite number"),
    ("optimizer.weight_decay=.nan", r"optimizer\.weight_decay: expected a finite number"),
    ("optimizer.lr=nan", r"optimizer\.lr: expected a finite number"),
    ("model.init_std=.nan", r"model\.init_std: expected a finite number"),
    ("training.train_steps=.inf", r"training\.train_steps: expected an integer"),
    ("training.train_steps=1e400", r"training\.train_steps: expected an integer"),
    ("training.eval_batches=-1", r"training\.eval_batches: must be >= 0"),
    ("model.kv_channels=0", r"model\.kv_channels: must be >= 1"),
    ("model.kv_channels=15", r"model\.kv_channels: rotary embeddings .* must be even"),
])
def test_non_finite_and_impossible_values_name_the_field(tmp_path, override, message):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x]}\n")
    with pytest.raises(ValueError, match=message):
        load_pretrain_config(str(f), [override])


def test_large_integers_stay_exact_and_typos_get_a_suggestion(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata: {path: [x], seed: 9007199254740993}\n")
    assert load_pretrain_config(str(f)).data.seed == 9007199254740993  # not rounded through a float
    with pytest.raises(ValueError, match=r"optimizer\.weight_decai: unknown key \(did you mean optimizer\.weight_decay\?"):
        load_pretrain_config(str(f), ["optimizer.weight_decai=0.1"])


def test_model_command_names_its_flags(capsys):
    from kdtrain.cli import main

    assert main(["model", "tiny", "--tp", "2"]) == 0 and "padded 512 for tp=2" in capsys.readouterr().out
    for args, message in ((["--pp", "0"], "--pp: must be >= 1"), (["--tp", "-2"], "--tp: must be >= 1"),
                          (["--tp", "3"], "--tp: 3 does not divide num_attention_heads=4")):
        assert main(["model", "tiny", *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_split_gpus_per_node_must_be_positive(value):
    """0 is not "unset": it was taken as falsy and replaced by torchrun's LOCAL_WORLD_SIZE."""
    from kdtrain.config.distill import load_distill_config

    with pytest.raises(ValueError, match=r"^split\.gpus_per_node: must be >= 1"):
        load_distill_config("tiny", ["data.mock=true", "split.mode=auto", f"split.gpus_per_node={value}"])
    assert load_distill_config("tiny", ["data.mock=true", "split.gpus_per_node=1"]).split.gpus_per_node == 1


def test_yaml_merge_keys_and_list_overrides(tmp_path):
    """The duplicate-key check leaves YAML merge keys alone (`<<: *base`, then an override of one
    of its keys), and an override's text reaches a list of strings as typed."""
    from kdtrain.config.loader import load_yaml

    f = tmp_path / "run.yaml"
    f.write_text("a: &b {lr: 1.0e-3, min_lr: 1.0e-4}\noptimizer:\n  <<: *b\n  lr: 2.0e-3\n")
    assert load_yaml(f)["optimizer"] == {"lr": 2.0e-3, "min_lr": 1.0e-4}
    f.write_text("model: tiny\ndata: {path: [x]}\n")
    assert load_pretrain_config(str(f), ["data.path=2024"]).data.path == ["2024"]


@pytest.mark.parametrize("script,target", [("pretrain_gpt", "pretrain"), ("distill_gpt", "distill"),
                                           ("cache_teacher", "run_cache_job")])
def test_entry_points_take_overrides_before_and_after_their_options(script, target, monkeypatch):
    """`distill_gpt.py data.mock=true --config tiny training.train_steps=1`: overrides on both
    sides of an option (argparse's plain parser called the later ones unrecognized arguments)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"entry_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    monkeypatch.setattr(module, "run_job", lambda job, **kw: job() or 0)
    monkeypatch.setattr(module, target, lambda cfg, *a, **kw: seen.append(cfg))
    argv = ["data.mock=true", "--config", "tiny", "training.train_steps=3"]
    if script == "cache_teacher":
        argv += ["--out", "somewhere", "cache.dtype=bf16", "teacher.random_init=true"]
    assert module.main(argv) == 0
    assert seen[0].data.mock and seen[0].training.train_steps == 3


def test_settings_without_effect_are_named():
    """A value other than the default in a field another setting switches off is listed for the
    run's log (kdtrain/config/inert.py); the shipped configs have none."""
    import glob

    from kdtrain.config.distill import load_distill_config
    from kdtrain.config.inert import inert_settings

    cfg = load_distill_config("tiny", ["loss.beta=0.9", "onpolicy.temperature=0.7", "optimizer.decay_style=constant",
                                       "optimizer.min_lr=0.0", "logging.wandb_project=x", "split.depth=3"])
    assert inert_settings(cfg) == ["optimizer.min_lr (optimizer.decay_style is constant)",
                                   "logging.wandb_project (logging.wandb is off)",
                                   "split.depth (split.mode is colocated)",
                                   "loss.beta (loss.divergence is forward_kl)",
                                   "onpolicy.temperature (onpolicy.fraction is 0)"]
    cached = load_distill_config("tiny", ["teacher.source=cache", "teacher.cache=c", "teacher.tp=2"])
    assert inert_settings(cached) == ["teacher.tp (teacher.source is cache: no teacher is built)",
                                      "teacher.random_init (teacher.source is cache: no teacher is built)"]  # tiny's
    more = load_distill_config("tiny", ["checkpoint.dir=null", "checkpoint.keep=5", "data.split=[1.0,0.0]",
                                        "training.eval_batches=3", "loss.tau=1.0", "loss.scale_by_tau_sq=true"])
    assert inert_settings(more) == ["checkpoint.keep (checkpoint.dir is not set)",
                                    "training.eval_batches (data.split holds out nothing)",
                                    "loss.scale_by_tau_sq (loss.tau is 1)"]
    auto = load_distill_config("tiny", ["split.mode=auto", "split.depth=3"])  # the planner prices plans with it
    assert inert_settings(auto) == []
    acting = load_distill_config("tiny", ["loss.divergence=jsd", "loss.beta=0.9", "onpolicy.fraction=0.5",
                                          "onpolicy.temperature=0.7", "optimizer.min_lr=0.0"])
    assert inert_settings(acting) == []
    constant = load_pretrain_config("tiny", ["optimizer.decay_style=constant", "optimizer.decay_steps=5"])
    assert "optimizer.decay_steps (optimizer.decay_style is constant)" in inert_settings(constant)
    for path in glob.glob(str(CONFIG_DIR / "*" / "*.yaml")):
        if "/models/" not in path:
            load = load_distill_config if "/distill/" in path else load_pretrain_config
            assert inert_settings(load(path)) == [], path


def test_a_config_folder_without_named_configs_is_named(monkeypatch, tmp_path):
    """KDTRAIN_CONFIG_DIR pointing at no configs: the error names it ('not one of []' before)."""
    from kdtrain.config import loader

    monkeypatch.setattr(loader, "CONFIG_DIR", tmp_path / "nope")
    monkeypatch.setenv("KDTRAIN_CONFIG_DIR", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=rf"unknown distill config 'tiny': not a YAML file, and "
                                         rf"KDTRAIN_CONFIG_DIR={tmp_path}/nope has no distill/ folder"):
        loader.resolve_config_path("tiny", "distill")
