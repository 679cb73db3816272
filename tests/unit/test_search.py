"""Search, then confirm (launcher/search.py): distributions, each bad input's message, and the plan of each cell."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from launcher.cli import main
from launcher.search import Distribution, parse_distribution
from launcher.spec import expand, load_spec

SPACE = {"metadistil.teacher_lr": "loguniform(1e-7, 1e-4)", "optim.lr": "loguniform(1e-5, 1e-3)",
         "distill.alpha": "uniform(0.1, 0.9)", "distill.temperature": "choice(1, 2, 4)"}
SPEC = {
    "name": "unit",
    "base": {"data": {"name": "synthetic", "train_size": 100, "quiz_size": 16, "validation_size": 20,
                      "test_size": 20}, "metadistil": {"quiz_batch_size": 8}},
    "teachers": {"bert": {"checkpoint": "bert-base-uncased", "label": "BERT"}},
    "teacher_sets": {"bert": ["bert"]},
    "students": {"distil": {"name": "distilbert-base-uncased", "label": "DistilBERT"}},
    "grid": {"algorithm": ["finetune", "kd", "metadistil"], "seed": [1, 2]},
    "search": {"space": SPACE, "num_samples": 4, "scheduler": {"type": "asha", "grace_period": 1,
                                                               "reduction_factor": 2}},
    "confirm": {"seeds": [11, 12, 13]},
}


def write(tmp_path, spec):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**spec, "storage_path": str(tmp_path / "storage")}))
    return path


def plan_of(tmp_path, spec=SPEC):
    return expand(*load_spec(write(tmp_path, spec)))


@pytest.mark.parametrize(("text", "kind", "args"), [
    ("loguniform(1e-7, 1e-4)", "loguniform", (1e-7, 1e-4)),
    ("uniform(0.1,0.9)", "uniform", (0.1, 0.9)),
    ("uniform(0, 2)", "uniform", (0.0, 2.0)),
    ("choice(1, 2, 4)", "choice", (1, 2, 4)),
    ("choice(exact, lagged)", "choice", ("exact", "lagged")),
    ("choice(1e-5, 0.5)", "choice", (1e-5, 0.5)),
    ("randint(1, 8)", "randint", (1, 8)),
])
def test_distributions_parse(text, kind, args):
    assert parse_distribution(text) == Distribution(kind, args)


@pytest.mark.parametrize("text", ["normal(0, 1)", "loguniform(0, 1)", "loguniform(1e-3, 1e-5)", "uniform(2, 2)",
                                  "uniform(a, b)", "randint(1.5, 3)", "randint(3)", "choice()", "1e-5", "choice(1, 1)"])
def test_bad_distributions_say_what_is_allowed(text):
    with pytest.raises(ValueError, match=re.escape(text) + ".*(allowed: loguniform|more than once)"):
        parse_distribution(text)


def test_draws_stay_within_their_ranges():
    rng = np.random.default_rng(0)
    log, uniform, ints = (parse_distribution(t) for t in ("loguniform(1e-7, 1e-4)", "uniform(0.1, 0.9)",
                                                          "randint(1, 3)"))
    draws = [log.draw(rng) for _ in range(200)]
    assert all(1e-7 <= d <= 1e-4 for d in draws) and min(draws) < 1e-6 and max(draws) > 1e-5  # spread in log
    assert all(0.1 <= uniform.draw(rng) <= 0.9 for _ in range(200))
    assert {ints.draw(rng) for _ in range(200)} == {1, 2, 3}  # both ends included


def test_each_cell_gets_its_search_and_confirm_trials(tmp_path):
    plan = plan_of(tmp_path)
    cells = {c.id: c for c in plan.search.cells}
    assert list(cells) == ["finetune__none__distil__w0__off", "kd__bert__distil__w0__off",
                           "metadistil__bert__distil__w0__off"]
    # per algorithm, only the keys it reads: finetune no distill.* or metadistil.*, kd no metadistil.*
    assert [sorted(c.space) for c in cells.values()] == [
        ["optim.lr"], ["distill.alpha", "distill.temperature", "optim.lr"],
        ["distill.alpha", "distill.temperature", "metadistil.teacher_lr", "optim.lr"]]
    assert len(plan.search.trials) == 3 * 4 and len(plan.trials) == 3 * 3
    kd = cells["kd__bert__distil__w0__off"]
    assert [t.id for t in kd.trials] == [f"kd__bert__distil__w0__off__search{i}" for i in range(4)]
    assert {t.config.seed for t in plan.search.trials} == {1}  # the grid's first seed
    assert [t.config.seed for t in kd.confirm] == [11, 12, 13]
    assert [t.id for t in kd.confirm] == [f"kd__bert__distil__w0__off__s{s}" for s in (11, 12, 13)]
    for trial, values in zip(kd.trials, kd.samples):
        assert (trial.config.optim.lr, trial.config.distill.alpha, trial.config.distill.temperature) == \
            (values["optim.lr"], values["distill.alpha"], values["distill.temperature"])
        assert 1e-5 <= values["optim.lr"] <= 1e-3 and 0.1 <= values["distill.alpha"] <= 0.9
        assert values["distill.temperature"] in (1, 2, 4) and trial.phase == "search"
        assert trial.config.output.dir.endswith(f"/unit/trials/{trial.id}")
    assert len({v["optim.lr"] for c in cells.values() for v in c.samples}) == 12  # every cell draws its own
    assert all(t.phase == "confirm" and t.config.optim.lr == 6e-5 for t in plan.trials)  # base until chosen
    assert all(c.metric == "val_accuracy" and c.ranked_by == "best_val_accuracy" for c in cells.values())


def test_draws_are_the_same_in_every_expansion_and_follow_the_name(tmp_path):
    first, again = plan_of(tmp_path), plan_of(tmp_path)
    assert [c.samples for c in first.search.cells] == [c.samples for c in again.search.cells]
    assert first.config_hash == again.config_hash
    renamed = plan_of(tmp_path, {**SPEC, "name": "other"})
    assert [c.samples for c in renamed.search.cells] != [c.samples for c in first.search.cells]
    # a key added to the space leaves the other keys' draws as they were
    wider = plan_of(tmp_path, {**SPEC, "search": {**SPEC["search"],
                                                 "space": {**SPACE, "optim.weight_decay": "uniform(0, 0.1)"}}})
    assert [[{k: v for k, v in s.items() if k != "optim.weight_decay"} for s in c.samples]
            for c in wider.search.cells] == [c.samples for c in first.search.cells]
    assert wider.config_hash != first.config_hash


def test_a_key_restricted_to_algorithms_and_a_cell_with_nothing_to_search(tmp_path):
    space = {"optim.lr": {"algorithms": ["kd"], "dist": "loguniform(1e-5, 1e-3)"}}
    plan = plan_of(tmp_path, {**SPEC, "search": {"space": space, "num_samples": 2}})
    counts = {c.id.partition("__")[0]: len(c.trials) for c in plan.search.cells}
    assert counts == {"finetune": 0, "kd": 2, "metadistil": 0}
    assert len(plan.trials) == 9  # every cell is confirmed; without a search, with the base's values


def test_confirm_seeds_default_to_the_grid_seeds(tmp_path):
    plan = plan_of(tmp_path, {k: v for k, v in SPEC.items() if k != "confirm"})
    assert sorted({t.config.seed for t in plan.trials}) == [1, 2]


@pytest.mark.parametrize(("change", "message"), [
    ({"search.space": {"optim.lrr": "uniform(1, 2)"}},
     "search.space.optim.lrr: unknown trial key (keys of optim: lr, weight_decay, schedule"),
    ({"search.space": {"distil.alpha": "uniform(1, 2)"}}, ("search.space.distil.alpha: unknown trial key (keys of "
                                                          "the top level: seed, algorithm")),
    ({"search.space": {"optim": "uniform(1, 2)"}}, "search.space.optim: is a section; search one of its keys"),
    ({"search.space": {"seed": "randint(1, 3)"}}, "search.space.seed: seed is set by the sweep spec"),
    ({"search.space": {"distill.alpha": "uniform(0, 2)"}},
     ("search.space.distill.alpha: uniform(0, 2) reaches 2.0, which cell kd__bert__distil__w0__off refuses: invalid "
     "trial config: distill.alpha: Input should be less than or equal to 1 (got 2.0)")),
    ({"search.space": {"optim.lr": "gauss(1, 2)"}},
     ("search.space.optim.lr: 'gauss(1, 2)' is not a distribution; allowed: loguniform(a, b) with 0 < a < b, "
     "uniform(a, b) with a < b, choice(v1, v2, ...), or randint(a, b)")),
    ({"search.space": {"optim.lr": "loguniform(0, 1e-3)"}}, ("search.space.optim.lr: 'loguniform(0, 1e-3)' is not a "
                                                           "valid loguniform; allowed: loguniform(a, b) with 0 < a")),
    ({"search.space": {"distill.alpha": {"algorithms": ["finetune"], "dist": "uniform(0.1, 0.2)"}}},
     "search.space.distill.alpha: finetune does not read distill.* keys"),
    ({"search.space": {"optim.lr": 0.1}}, "search.space.optim.lr: 0.1 is not a distribution; allowed: loguniform"),
    ({"search.space": {"optim.lr": {"dist": "uniform(1, 2)"}}},
     "search.space.optim.lr.algorithms: Field required (a restricted key is {algorithms: [...], dist: ...})"),
    ({"search.space": {"optim.lr": {"algorithms": ["kdx"], "dist": "uniform(1, 2)"}}},
     "search.space.optim.lr.algorithms.0: Input should be 'finetune', 'kd' or 'metadistil'"),
    ({"search": None}, "confirm: needs a search section (it runs the values a search chose)"),
    ({"search.metric": "val_f1"}, ("search.metric: the trials of cell finetune__none__distil__w0__off (task none) "
                                  "never report 'val_f1'; allowed: val_accuracy, best_val_accuracy")),
    ({"search.scheduler": {"type": "hyperband"}}, "search.scheduler.type: Input should be 'asha'"),
    ({"search.num_samples": 0}, "search.num_samples: Input should be greater than or equal to 1"),
    ({"confirm": {"seeds": [1, 1]}}, "confirm.seeds: 1 is given more than once"),
    ({"grid.extra": {"optim.lr": [1e-4]}}, "search.space.optim.lr: is a grid.extra axis too"),
    ({"search.space": {"data.task": "choice(cola, rte)"}},
     "search.space.data.task: says which data the cell's teachers learn; give it as a grid.extra axis"),
    # the update that reuses the first-order gradient cannot meet double_backward, in the base or in the draws
    ({"base.metadistil.update": "lagged",
      "search.space": {"metadistil.meta_gradient": "choice(forward_ad, double_backward)"}},
     ("search.space.metadistil.meta_gradient: choice(forward_ad, double_backward) reaches 'double_backward', which "
     "cell metadistil__bert__distil__w0__off refuses: invalid trial config: metadistil: metadistil.update 'lagged'")),
    ({"search.space": {"metadistil.meta_gradient": "choice(forward_ad, double_backward)",
                       "metadistil.update": "choice(exact, lagged)"}},
     ("search.space: the draw {'metadistil.meta_gradient': 'double_backward', 'metadistil.update': 'lagged'} of "
     "metadistil__bert__distil__w0__off__search1 makes an invalid trial")),
])
def test_bad_searches_fail_at_the_dry_run_in_one_line(tmp_path, capsys, change, message):
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in change.items()]
    assert main(["sweep", str(write(tmp_path, SPEC)), "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_dry_run_prints_the_space_the_budget_and_the_draws(tmp_path, capsys):
    assert main(["sweep", str(write(tmp_path, SPEC)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = plan_of(tmp_path)
    assert ("search then confirm: 12 search trials + 9 confirm trials (their searched values chosen by search) = 21 "
            "trials") in out
    assert "num_samples 4 per cell; scheduler asha per cell (grace_period 1, reduction_factor 2)" in out
    assert "    metadistil.teacher_lr: loguniform(1e-07, 0.0001)\n    optim.lr: loguniform(1e-05, 0.001)\n" in out
    assert len(plan.search.trials) == 12 and len(plan.trials) == 9
    kd = plan.search.cells[1]
    assert f"  cell {kd.id}: 4 search trials (seed 1, by val_accuracy), confirm seeds 11, 12, 13" in out
    first = kd.samples[0]  # in the space's order (the spec file's keys, sorted by the YAML dump here)
    assert (f"    search0: distill.alpha={first['distill.alpha']:g}, distill.temperature="
            f"{first['distill.temperature']}, optim.lr={first['optim.lr']:g}\n") in out
