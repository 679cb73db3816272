"""Models: a student built from a teacher's layers, label-count checks when loading, 'package:' names, parameter
counts and the report's 'times smaller'."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import tiny
from trainer.config import ConfigError, ModelConfig
from trainer.models import (
    count_parameters,
    display_label,
    layer_count,
    load_model,
    resolve_name,
    student_from_teacher,
    times_smaller,
)


def _layer_prefix(model) -> str:
    return "bert.encoder.layer" if hasattr(model, "bert") else "distilbert.transformer.layer"


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_student_from_teacher_copies_embeddings_and_chosen_layers(tokenizers, kind):
    if kind == "bert":
        teacher = tiny.tiny_bert(tokenizers["wordpiece"], layers=4, seed=5)
    else:
        teacher = tiny.tiny_distilbert(tokenizers["wordpiece_cased"], layers=4, seed=5)
    layers = [0, 3, 1]
    student = student_from_teacher(teacher, layers)
    assert type(student) is type(teacher)
    assert layer_count(student) == 3 and layer_count(teacher) == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    prefix = _layer_prefix(teacher)
    # every non-layer tensor (embeddings, pooler, classifier) is copied
    shared = [k for k in t_state if f"{prefix}." not in k]
    assert any("embeddings" in k for k in shared) and any("classifier" in k for k in shared)
    for key in shared:
        assert torch.equal(s_state[key], t_state[key]), key
    # student layer j is teacher layer layers[j], tensor by tensor
    for new, old in enumerate(layers):
        t_keys = [k for k in t_state if k.startswith(f"{prefix}.{old}.")]
        assert t_keys
        for key in t_keys:
            s_key = key.replace(f"{prefix}.{old}.", f"{prefix}.{new}.")
            assert torch.equal(s_state[s_key], t_state[key]), s_key
    # copies, not shared storage: training the student leaves the teacher alone
    emb = next(k for k in shared if "word_embeddings" in k)
    assert s_state[emb].data_ptr() != t_state[emb].data_ptr()
    # and the copied model computes: same output as the teacher would give with those layers
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    teacher.eval(), student.eval()
    assert student(input_ids=ids).logits.shape == (1, 2)


def test_student_from_teacher_identity_layers_gives_the_same_outputs(tokenizers):
    teacher = tiny.tiny_bert(tokenizers["wordpiece"], layers=3, seed=2).eval()
    student = student_from_teacher(teacher, [0, 1, 2]).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
    mask = (ids != 0).long()
    assert torch.allclose(student(input_ids=ids, attention_mask=mask).logits,
                          teacher(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_student_keeps_the_teacher_dtype(tokenizers):
    teacher = tiny.tiny_bert(tokenizers["wordpiece"], layers=2, seed=2).to(torch.float64)
    student = student_from_teacher(teacher, [1])
    assert next(student.parameters()).dtype == torch.float64
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(student.state_dict()[key], teacher.state_dict()[key.replace(".0.", ".1.")])


@pytest.mark.parametrize("layers,fragment", [([0, 4], "[4] do not exist"), ([7], "[7] do not exist"),
                                             ([-1], "[-1] do not exist"), ([1, 1], "distinct"), ([], "non-empty")])
def test_student_from_teacher_refuses_bad_layers(tokenizers, layers, fragment):
    teacher = tiny.tiny_bert(tokenizers["wordpiece"], layers=4)
    with pytest.raises(ConfigError) as info:
        student_from_teacher(teacher, layers)
    message = str(info.value)
    assert message.startswith("student.init_layers:") and fragment in message, message
    if "exist" in fragment:
        assert "0..3" in message


@pytest.fixture(scope="module")
def saved_bert(tokenizers, tmp_path_factory):
    return tiny.save(tiny.tiny_bert(tokenizers["wordpiece"]), tokenizers["wordpiece"],
                     tmp_path_factory.mktemp("saved") / "bert")


def test_load_model_loads_a_saved_classifier(saved_bert):
    loaded = load_model(ModelConfig(name=saved_bert), 2, "teachers[0]")
    assert loaded.model.config.num_labels == 2
    assert loaded.label == "bert"
    assert loaded.tokenizer("good movie")["input_ids"][0] == loaded.tokenizer.cls_token_id


@pytest.mark.parametrize("key", ["teachers[0]", "teachers.1", "student"])
def test_load_model_refuses_a_label_count_mismatch(saved_bert, key):
    with pytest.raises(ConfigError) as info:
        load_model(ModelConfig(name=saved_bert), 3, key)
    message = str(info.value)
    assert message.startswith(f"{key}.name:"), message
    assert "2 labels" in message and "has 3" in message


def test_load_model_missing_model_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^teachers\[1\]\.name: cannot load model"):
        load_model(ModelConfig(name=str(tmp_path / "absent")), 2, "teachers[1]")


def test_load_model_bad_tokenizer_names_the_key(saved_bert, tmp_path):
    with pytest.raises(ConfigError, match=r"^student\.tokenizer: cannot load tokenizer"):
        load_model(ModelConfig(name=saved_bert, tokenizer=str(tmp_path / "no-tokenizer")), 2, "student")


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def make(name: str, body: str):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_resolve_name_package_with_get_model_path(package_dir, tmp_path, saved_bert):
    module = package_dir("md_test_models_pkg", f"""
        from pathlib import Path
        def get_model_path():
            return Path({saved_bert!r})
        """)
    assert resolve_name(f"package:{module}") == saved_bert
    assert resolve_name("bert-base-uncased") == "bert-base-uncased"
    assert resolve_name(str(tmp_path)) == str(tmp_path)
    loaded = load_model(ModelConfig(name=f"package:{module}"), 2, "teachers[0]")
    assert loaded.label == module and count_parameters(loaded.model) > 0


def test_resolve_name_missing_module():
    with pytest.raises(ConfigError, match=r"'md_no_such_module_xyz' is not installed"):
        resolve_name("package:md_no_such_module_xyz")


def test_resolve_name_module_without_get_model_path(package_dir):
    module = package_dir("md_test_models_nopath", "X = 1\n")
    with pytest.raises(ConfigError, match="has no get_model_path"):
        resolve_name(f"package:{module}")


def test_resolve_name_module_with_a_missing_dependency_is_not_called_uninstalled(package_dir):
    module = package_dir("md_test_models_brokendep", "import md_dependency_that_is_absent\n")
    with pytest.raises(ConfigError) as info:
        resolve_name(f"package:{module}")
    assert "importing 'md_test_models_brokendep' failed" in str(info.value)
    assert "md_dependency_that_is_absent" in str(info.value)


def test_display_label():
    assert display_label(ModelConfig(name="/models/bert-base-uncased/")) == "bert-base-uncased"
    assert display_label(ModelConfig(name="package:my.models")) == "my.models"
    assert display_label(ModelConfig(name="org/roberta-base", label="R")) == "R"


def test_count_parameters(tokenizers):
    layer = torch.nn.Linear(3, 4)  # 3*4 + 4
    assert count_parameters(layer) == 16
    model = tiny.tiny_bert(tokenizers["wordpiece"], layers=2)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # removing a layer removes exactly that layer's parameters
    one = student_from_teacher(model, [0])
    per_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.1."))
    assert count_parameters(model) - count_parameters(one) == per_layer > 0


def test_times_smaller_matches_the_report():
    assert times_smaller(66955010, [109483778, 124647170]) == pytest.approx(1.7484, abs=5e-5)
    assert times_smaller(66955010, [109483778, 124647170]) == pytest.approx(
        (109483778 + 124647170) / 2 / 66955010, rel=1e-15)
    assert times_smaller(50, [100]) == 2.0
