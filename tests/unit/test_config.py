"""Config validation: every malformed config is refused with a message naming the dotted key, the value and what is
allowed; overrides, flatten and explain."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ValidationError

from trainer.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    NoiseSide,
    OptimConfig,
    StudentConfig,
    TrialConfig,
    explain,
    flatten,
    load_config,
    parse_config,
)
from trainer.overrides import apply_overrides

TEACHER = {"name": "teacher-a"}
KD = {"algorithm": "kd", "teachers": [TEACHER]}


def with_(base: dict, **sections) -> dict:
    return {**base, **sections}


# (id, raw config, fragments the message must contain: the dotted key first, then value / allowed values)
MALFORMED = [
    ("unknown-top-level-key", with_(KD, optimiser={"lr": 1}),
     ["optimiser: unknown key", "allowed here: seed, algorithm, device, data"]),
    ("unknown-nested-key", with_(KD, optim={"lrr": 1e-4}),
     ["optim.lrr: unknown key", "lr, weight_decay, schedule, warmup_ratio, batch_size, epochs, max_steps, grad_clip"]),
    ("unknown-key-in-list-item", {"algorithm": "kd", "teachers": [{"name": "a", "nme": "b"}]},
     ["teachers.0.nme: unknown key", "name, tokenizer, label"]),
    ("unknown-deep-key", with_(KD, noise={"student": {"prob": 0.1}}),
     ["noise.student.prob: unknown key", "p, mode, token"]),
    ("wrong-type", with_(KD, optim={"lr": "fast"}), ["optim.lr:", "valid number", "'fast'"]),
    ("wrong-type-section", with_(KD, data=5), ["data:", "valid dictionary", "got 5"]),
    ("wrong-type-list", {"algorithm": "kd", "teachers": "bert"}, ["teachers:", "valid list", "'bert'"]),
    ("p-equal-1", with_(KD, noise={"student": {"p": 1.0}}), ["noise.student.p:", "less than 1", "1.0"]),
    ("p-negative", with_(KD, noise={"teacher": {"p": -0.1}}), ["noise.teacher.p:", "greater than or equal to 0",
                                                                "-0.1"]),
    ("negative-lr", with_(KD, optim={"lr": -1e-5}), ["optim.lr:", "greater than 0", "-1e-05"]),
    ("zero-batch-size", with_(KD, optim={"batch_size": 0}), ["optim.batch_size:", "greater than or equal to 1",
                                                             "got 0"]),
    ("fractional-batch-size", with_(KD, optim={"batch_size": 2.5}), ["optim.batch_size:", "valid integer", "2.5"]),
    ("zero-temperature", with_(KD, distill={"temperature": 0}), ["distill.temperature:", "greater than 0"]),
    ("alpha-above-1", with_(KD, distill={"alpha": 1.5}), ["distill.alpha:", "less than or equal to 1", "1.5"]),
    ("negative-seed", with_(KD, seed=-3), ["seed:", "greater than or equal to 0", "-3"]),
    ("bad-algorithm", with_(KD, algorithm="distil"), ["algorithm:", "'finetune', 'kd' or 'metadistil'", "'distil'"]),
    ("bad-precision", with_(KD, deepspeed={"precision": "fp8"}),
     ["deepspeed.precision:", "'fp32', 'bf16' or 'fp16'", "'fp8'"]),
    ("bad-noise-mode", with_(KD, noise={"teacher": {"mode": "char"}}),
     ["noise.teacher.mode:", "'vocab' or 'token'", "'char'"]),
    ("bad-device", with_(KD, device="tpu"), ["device:", "'auto', 'cpu' or 'cuda'", "'tpu'"]),
    ("bad-meta-gradient", with_(KD, metadistil={"meta_gradient": "reverse"}),
     ["metadistil.meta_gradient:", "'forward_ad', 'finite_difference' or 'double_backward'"]),
    ("finetune-with-teachers", {"algorithm": "finetune", "teachers": [TEACHER]},
     ["teachers:", "finetune trains without teachers"]),
    ("kd-without-teachers", {"algorithm": "kd"}, ["teachers:", "'kd' needs at least one teacher"]),
    ("metadistil-without-teachers", {}, ["teachers:", "'metadistil' needs at least one teacher"]),
    ("unknown-student-key", with_(KD, student={"init_from_teacher": 0}),
     ["student.init_from_teacher:", "unknown key", "init_layers"]),
    ("duplicate-init-layers", with_(KD, student={"init_layers": [0, 2, 0]}),
     ["student.init_layers:", "distinct", "[0, 2, 0]", "repeated: [0]"]),
    ("negative-init-layers", with_(KD, student={"init_layers": [-1, 1]}),
     ["student.init_layers:", "non-negative", "negative: [-1]"]),
    ("empty-init-layers", with_(KD, student={"init_layers": []}),
     ["student.init_layers:", "at least 1 item"]),
    ("finite-difference-in-bf16", {"teachers": [TEACHER], "metadistil": {"meta_gradient": "finite_difference"},
                                   "deepspeed": {"enabled": True, "precision": "bf16"}},
     ["metadistil.meta_gradient:", "finite_difference needs fp32 compute", "bf16"]),
    ("fp16-with-metadistil", {"teachers": [TEACHER], "device": "cuda", "deepspeed": {"precision": "fp16"}},
     ["deepspeed.precision:", "fp16 cannot run algorithm 'metadistil'", "bf16", "fp32"]),
    ("zero3-with-metadistil", {"teachers": [TEACHER], "deepspeed": {"zero_stage": 3}},
     ["deepspeed.zero_stage:", "ZeRO-3", "0, 1 or 2"]),
    ("bf16-without-deepspeed", with_(KD, deepspeed={"precision": "bf16", "enabled": False}),
     ["deepspeed.precision:", "needs deepspeed.enabled: true"]),
    ("zero-stage-4", with_(KD, deepspeed={"zero_stage": 4}), ["deepspeed.zero_stage:", "less than or equal to 3"]),
    ("quiz-batch-larger-than-quiz", {"teachers": [TEACHER], "data": {"quiz_size": 8},
                                     "metadistil": {"quiz_batch_size": 16}},
     ["metadistil.quiz_batch_size:", "16 exceeds data.quiz_size=8"]),
    ("fp16-on-cpu", with_(KD, device="cpu", deepspeed={"precision": "fp16"}),
     ["deepspeed.precision:", "fp16 is not supported on CPU", "fp32 or bf16"]),
    ("missing-teacher-name", {"algorithm": "kd", "teachers": [TEACHER, {"label": "b"}]},
     ["teachers.1.name: required key is missing"]),
    ("empty-teacher-name", {"algorithm": "kd", "teachers": [{"name": ""}]},
     ["teachers.0.name:", "at least 1 character"]),
    ("max-length-too-small", with_(KD, data={"max_length": 4}), ["data.max_length:", "greater than or equal to 8"]),
    ("empty-output-dir", with_(KD, output={"dir": ""}), ["output.dir:", "at least 1 character"]),
]


@pytest.mark.parametrize("raw,fragments", [pytest.param(r, f, id=i) for i, r, f in MALFORMED])
def test_malformed_config_is_refused_naming_the_key(raw, fragments):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    # one line (the CLI shows a bad input as one line), each problem starting with its key
    key = fragments[0].split(":")[0]
    assert "\n" not in message and re.search(rf"(^invalid trial config: |; ){re.escape(key)}:", message), message


def test_several_problems_are_listed_on_one_line():
    with pytest.raises(ConfigError) as info:
        parse_config(with_(KD, optim={"lr": -1, "batch_size": 0}))
    assert str(info.value) == ("invalid trial config: optim.lr: Input should be greater than 0 (got -1); "
                               "optim.batch_size: Input should be greater than or equal to 1 (got 0)")


def test_there_are_at_least_15_distinct_malformed_configs():
    assert len({i for i, _, _ in MALFORMED}) >= 15


def test_several_problems_are_all_reported():
    with pytest.raises(ConfigError) as info:
        parse_config(with_(KD, optim={"lr": 0, "batch_size": 0}, noise={"student": {"p": 2}}))
    message = str(info.value)
    for key in ("optim.lr:", "optim.batch_size:", "noise.student.p:"):
        assert key in message


@pytest.mark.parametrize("raw", [["algorithm: kd"], "algorithm: kd", None, 3])
def test_top_level_must_be_a_mapping(raw):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(raw)


def test_valid_configs_parse():
    assert parse_config({"algorithm": "finetune"}).teachers == []
    cfg = parse_config({"teachers": [TEACHER, {"name": "b"}],
                        "student": {"name": "b", "init_layers": [0, 2, 4]}})
    assert cfg.algorithm == "metadistil"
    assert cfg.student.init_layers == [0, 2, 4]
    # ZeRO-3 is fine for kd, and for metadistil when DeepSpeed is off; fp16 is fine when the device is not cpu
    parse_config(with_(KD, deepspeed={"zero_stage": 3}))
    parse_config({"teachers": [TEACHER], "deepspeed": {"zero_stage": 3, "enabled": False}})
    parse_config(with_(KD, device="auto", deepspeed={"precision": "fp16"}))
    # quiz_batch_size > quiz_size only matters for metadistil
    parse_config(with_(KD, data={"quiz_size": 8}))


# --- overrides ---------------------------------------------------------------------------------------------------

BASE = {"algorithm": "metadistil", "teachers": [{"name": "a"}, {"name": "b"}], "noise": {"student": {"p": 0.0}}}


def test_overrides_apply():
    raw = apply_overrides(BASE, ["algorithm=kd", "noise.student.p=0.1", "teachers.0.name=x",
                                 "student.init_layers=[0,2]", "student.name=b", "optim.lr=1e-4",
                                 "tracking.run_name=null"])
    cfg = parse_config(raw)
    assert cfg.algorithm == "kd"
    assert cfg.noise.student.p == 0.1
    assert [t.name for t in cfg.teachers] == ["x", "b"]
    assert cfg.student.init_layers == [0, 2]
    assert cfg.student.name == "b"
    assert cfg.optim.lr == 1e-4
    assert cfg.tracking.run_name is None
    assert BASE["teachers"][0]["name"] == "a" and BASE["algorithm"] == "metadistil", "the input must not change"


def test_override_accepts_bracket_index_and_whole_lists():
    raw = apply_overrides(BASE, ["teachers[1].name=y"])
    assert raw["teachers"][1]["name"] == "y"
    raw = apply_overrides({"algorithm": "kd"}, ["teachers=[{name: t1}, {name: t2}]"])
    assert [t.name for t in parse_config(raw).teachers] == ["t1", "t2"]


@pytest.mark.parametrize("override,fragments", [
    ("algorithm", ["'algorithm'", "expected dotted.key=value"]),
    ("=kd", ["'=kd'", "expected dotted.key=value"]),
    ("optim..lr=1", ["'optim..lr=1'", "expected dotted.key=value"]),
    ("teachers.2.name=x", ["override teachers.2.name:", "'2' is not an index into teachers", "0..1"]),
    ("teachers.first.name=x", ["override teachers.first.name:", "'first' is not an index into teachers"]),
    ("teachers.5=x", ["override teachers.5:", "'5' is not an index into teachers"]),
    ("algorithm.name=x", ["override algorithm.name:", "algorithm is a value", "not a section"]),
    ("noise.student.p.x=1", ["override noise.student.p.x:", "noise.student.p is a value"]),
    ("optim.lr=[1,", ["override optim.lr:", "not valid YAML"]),
])
def test_bad_overrides_are_refused(override, fragments):
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, [override])
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_override_index_into_a_missing_list():
    with pytest.raises(ConfigError, match=r"override teachers\.0\.name: teachers has no items"):
        apply_overrides({"algorithm": "kd"}, ["teachers.0.name=x"])


def test_override_then_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"noise\.student\.p: Input should be less than 1 \(got 1\)"):
        parse_config(apply_overrides(BASE, ["noise.student.p=1"]))


# --- files --------------------------------------------------------------------------------------------------------

def test_load_config_reads_yaml_and_applies_overrides(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("algorithm: kd\nteachers:\n  - name: a\noptim:\n  lr: 3.0e-5\n")
    cfg = load_config(path, ["optim.batch_size=8", "teachers.0.label=A"])
    assert (cfg.algorithm, cfg.optim.lr, cfg.optim.batch_size, cfg.teachers[0].label) == ("kd", 3e-5, 8, "A")


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("algorithm: kd\nteachers: [\n  - name: a\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_load_config_top_level_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- algorithm: kd\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, ["algorithm=kd"])


def test_load_config_validation_error_names_key(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("algorithm: kd\nteachers:\n  - name: a\noptim:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"optim\.batch_size: Input should be greater than or equal to 1"):
        load_config(path)


def test_empty_file_is_the_defaults_and_still_needs_teachers(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="teachers: algorithm 'metadistil' needs at least one teacher"):
        load_config(path)
    assert load_config(path, ["algorithm=finetune"]).algorithm == "finetune"


# --- flatten and explain ------------------------------------------------------------------------------------------

def test_flatten_keys_are_the_same_for_any_number_of_teachers():
    a = parse_config({"algorithm": "kd", "teachers": [{"name": "a"}]})
    b = parse_config({"algorithm": "metadistil", "teachers": [{"name": "b", "label": "B", "tokenizer": "t"}],
                      "student": {"name": "b", "init_layers": [0, 1]}, "data": {"validation_size": 5},
                      "optim": {"max_steps": 10, "grad_clip": None}, "noise": {"teacher": {"p": 0.2}}})
    two = flatten(parse_config({"algorithm": "kd", "teachers": [{"name": "a"}, {"name": "b", "tokenizer": "t"}]}))
    none = flatten(parse_config({"algorithm": "finetune"}))
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb) == set(two) == set(none)
    assert not [k for k in fa if re.match(r"teachers\.\d", k)], "no indexed teacher keys"
    assert (fa["teachers.count"], fa["teachers.name"], fa["teachers.tokenizer"]) == (1, ["a"], [None])
    assert (two["teachers.count"], two["teachers.name"], two["teachers.tokenizer"]) == (2, ["a", "b"], [None, "t"])
    assert (none["teachers.count"], none["teachers.name"]) == (0, [])
    assert fb["student.init_layers"] == [0, 1] and fb["noise.teacher.p"] == 0.2
    assert all(not isinstance(v, dict) for v in fa.values())


def _leaf_keys(model, prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and
                    issubclass(c, BaseModel)), None)
        if sub is not None and name != "teachers":
            yield from _leaf_keys(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_explain_lists_every_leaf_with_default_and_help():
    lines = explain()
    by_key = {}
    for line in lines:
        key, sep, rest = line.partition(" = ")
        if sep:
            by_key[key] = rest
    leaves = dict(_leaf_keys(TrialConfig))
    leaves.update({f"teachers.<i>.{n}": f for n, f in ModelConfig.model_fields.items()})
    assert set(leaves) <= set(by_key), set(leaves) - set(by_key)
    for key, field in leaves.items():
        default, _, help_text = by_key[key].partition(": ")
        expected = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        assert default == expected, key
        assert help_text and help_text == field.description, key
    # spot checks against the known defaults
    assert by_key["optim.lr"].startswith("6e-05: ")
    assert by_key["noise.student.p"].startswith("0.0: ")
    assert by_key["data.train_size"].startswith("30000: ")
    assert by_key["teachers.<i>.name"].startswith("required: ")
    # the flattened keys are all explained (teachers.x, the list of every teacher's x, as teachers.<i>.x)
    flat = flatten(parse_config(KD))
    for key in flat:
        if key == "teachers.count":
            continue
        assert re.sub(r"^teachers\.", "teachers.<i>.", key) in by_key, key


def test_sections_are_strict():
    for section in (DataConfig, OptimConfig, NoiseSide, StudentConfig):
        with pytest.raises(ValidationError, match="unknown\n  Extra inputs are not permitted"):
            section(unknown=1)


def test_a_key_given_twice_in_a_trial_config_is_refused(tmp_path):
    """YAML would silently keep the last value: a config that sets a key twice would run the second one."""
    path = tmp_path / "trial.yaml"
    path.write_text("algorithm: kd\nteachers: [{name: a}]\noptim:\n  lr: 1.0e-4\n  batch_size: 8\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: optim.lr: key given twice (lines 4 and 6); YAML would silently keep only "
                               f"the last value")
    path.write_text("algorithm: kd\nteachers: [{name: a}]\n")
    with pytest.raises(ConfigError, match=r"^override optim: value '\{lr: 1, lr: 2\}' is not valid YAML \(lr: key "
                       r"given twice"):
        load_config(path, ["optim={lr: 1, lr: 2}"])
