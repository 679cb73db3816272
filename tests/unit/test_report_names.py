"""Row names of Table 1: which grid.extra values a row's name carries."""

from __future__ import annotations

from launcher.identity import OFF
from launcher.report import Cell
from launcher.report_names import name_cells


def cell(block: int, algorithm: str, extras: tuple[str, ...], task: str | None = None) -> Cell:
    teachers = [] if algorithm == "finetune" else ["MiniLM"]
    return Cell(block, algorithm, "minilm" if teachers else "none", teachers, "L2", 0.0, OFF, extras, task)


def test_an_extra_names_the_rows_it_tells_apart():
    rows = [cell(1, "finetune", ("distill.hidden.beta=0",)), cell(2, "kd", ("distill.hidden.beta=0",)),
            cell(3, "metadistil", ("distill.hidden.beta=0",)), cell(3, "metadistil", ("distill.hidden.beta=100",))]
    name_cells(rows)
    assert [c.method for c in rows] == ["L2", "MiniLM L2", "MiniLM L2 (distill.hidden.beta=0)",
                                        "MiniLM L2 (distill.hidden.beta=100)"]
    assert rows[3].label == "MetaDistil: MiniLM → L2 (distill.hidden.beta=100)"


def test_a_value_other_than_the_usual_one_is_named_on_a_row_alone():
    # MetaDistil runs only with the hidden-state term: its row must say so though no other MetaDistil row differs
    rows = [cell(1, "finetune", ("distill.hidden.beta=0",)), cell(2, "kd", ("distill.hidden.beta=0",)),
            cell(3, "metadistil", ("distill.hidden.beta=100",))]
    name_cells(rows)
    assert [c.method for c in rows] == ["L2", "MiniLM L2", "MiniLM L2 (distill.hidden.beta=100)"]


def test_values_tied_for_usual_are_all_named_and_tables_are_counted_per_task():
    rows = [cell(1, "finetune", ("optim.lr=0.001", "seed_note=a"), "cola"),
            cell(2, "kd", ("optim.lr=0.0003", "seed_note=a"), "cola"),
            cell(2, "kd", ("optim.lr=0.001", "seed_note=a"), "stsb")]
    name_cells(rows)
    # CoLA: two values of lr, one row each; the one value of seed_note names nothing; STS-B has one row
    assert [c.method for c in rows] == ["L2 (optim.lr=0.001)", "MiniLM L2 (optim.lr=0.0003)", "MiniLM L2"]
    assert [c.label for c in rows] == ["CoLA · Fine-tune: L2 (optim.lr=0.001)",
                                       "CoLA · KD: MiniLM → L2 (optim.lr=0.0003)", "STS-B · KD: MiniLM → L2"]
