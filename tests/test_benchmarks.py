"""RewardBench / RewardBench 2 scoring rules (jaxrm.rewardbench.rules) on hand-made rewards."""

from __future__ import annotations

import math

import pytest

from jaxrm.errors import UserError
from jaxrm.rewardbench.rules import (
    BENCHMARKS,
    EXAMPLE_COUNTS,
    REWARDBENCH,
    REWARDBENCH2,
    SUBSET_MAPPING,
    TIES_FORMULAS,
    ScoredRow,
    benchmark_named,
    best_of_n,
    pair_correct,
    score_benchmark,
    section_scores,
    ties_score,
)


def test_constants_are_the_references():
    """rewardbench/constants.py: 23 subsets in 4 sections; math-prm weighted like all code."""
    assert sum(len(v) for v in SUBSET_MAPPING.values()) == len(EXAMPLE_COUNTS) == 23
    assert set(EXAMPLE_COUNTS) == {s for v in SUBSET_MAPPING.values() for s in v}
    code = [s for s in SUBSET_MAPPING["Reasoning"] if s.startswith("hep-")]
    assert len(code) == 6 and all(EXAMPLE_COUNTS[s] == 164 for s in code)
    assert EXAMPLE_COUNTS["math-prm"] == 984 == sum(EXAMPLE_COUNTS[s] for s in code)
    assert sum(EXAMPLE_COUNTS[s] for s in SUBSET_MAPPING["Chat"]) == 358
    assert BENCHMARKS[REWARDBENCH2].subsets == (
        "Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"
    )  # fmt: skip
    assert (BENCHMARKS[REWARDBENCH].hub_id, BENCHMARKS[REWARDBENCH].split) == (
        "allenai/reward-bench",
        "filtered",
    )
    assert (BENCHMARKS[REWARDBENCH2].hub_id, BENCHMARKS[REWARDBENCH2].split) == (
        "allenai/reward-bench-2",
        "test",
    )
    with pytest.raises(UserError, match="unknown benchmark 'rewardbench3'"):
        benchmark_named("rewardbench3")


def test_pair_ties_are_wrong_and_best_of_n_splits_ties():
    assert pair_correct(1.0, 0.5) == 1 and pair_correct(0.5, 0.5) == 0
    assert pair_correct(-1.0, 0.0) == 0
    assert best_of_n([2.0, 1.0, 1.0, 0.0]) == 1.0
    assert best_of_n([1.0, 1.0, 0.0, 0.0]) == 0.5  # a tie at the top splits the credit
    assert best_of_n([1.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    assert best_of_n([1.0, 2.0, 0.0, 0.0]) == 0.0


def test_sections_weight_by_example_counts_over_present_subsets():
    scores = {"math-prm": 1.0, "hep-cpp": 0.0, "hep-go": 0.5, "alpacaeval-easy": 0.25}
    got = section_scores(scores)
    assert got["Reasoning"] == pytest.approx((984 * 1.0 + 164 * 0.0 + 164 * 0.5) / (984 + 328))
    assert got["Chat"] == 0.25  # one subset present: its own score
    assert got["Chat Hard"] is None and got["Safety"] is None


def reference_ties(rows, formula="0.1.4"):
    """The reference's process_single_model, written out plainly (scores as given): the margin
    term of rewardbench 0.1.4 (prompts with spread 0 left out) or of main (kept)."""
    groups = {}
    for row_id, num_correct, scores in rows:
        kind, k = row_id.split(":")
        groups.setdefault((kind, int(k)), []).extend(
            (i < num_correct, s) for i, s in enumerate(scores)
        )
    stats = {"ref": {}, "tied": {}}
    for (kind, k), samples in groups.items():
        good = [s for c, s in samples if c]
        bad = [s for c, s in samples if not c]
        spread = max(good) - min(good) if len(good) > 1 else None
        stats[kind][k] = (min(good) - max(bad) > 0, spread, min(good) - max(bad))
    both = set(stats["ref"]) & set(stats["tied"])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    tied_acc = mean([s[0] for s in stats["tied"].values()])
    ref_acc = mean([s[0] for s in stats["ref"].values()])
    pref = mean([stats["tied"][k][2] > stats["tied"][k][1] for k in both])
    hard = mean([min(stats["ref"][k][2], stats["tied"][k][2]) > stats["tied"][k][1] for k in both])
    margins = []
    for k in both:
        low, spread = min(stats["ref"][k][2], stats["tied"][k][2]), stats["tied"][k][1]
        if spread == 0 and formula == "0.1.4":
            continue
        if spread == 0:
            ratio = math.nan if low == 0 else math.copysign(math.inf, low)
        else:
            ratio = low / spread
        value = math.tanh(ratio - 1)
        margins.append(0.0 if math.isnan(value) else value)
    margin = mean(margins) if margins else 0.0
    return 0.3 * tied_acc + 0.3 * ref_acc + 0.2 * pref + 0.2 * hard + 0.01 * margin


# A Ties subset where the two versions part: tied:1, tied:2 and tied:3 have spread 0 (their
# correct answers get equal rewards) with a positive, zero and negative margin. The scores are
# allenai's own: `process_single_model` run on these rows, from rewardbench/utils.py of the
# released rewardbench 0.1.4 (PyPI wheel, identical to git tag v0.1.4, commit 6b95524) and of
# main at commit 05a9005 (github.com/allenai/reward-bench).
# By hand: tied accuracy 2/4, ref accuracy 3/4, preferred and preferred-hard 2/4 each (0.575 in
# all), plus 0.01 x the margin term: 0.1.4 averages tanh(min margin / spread - 1) over tied:0
# alone, tanh(0.75 / 0.25 - 1) = tanh(2); main over all four, (tanh(2) + 1 + 0 - 1) / 4.
SPREAD_ZERO_TIES = [
    ("tied:0", 2, [1.0, 0.75, 0.0]),  # spread 0.25, margin 0.75
    ("ref:0", 1, [2.0, 0.0]),
    ("tied:1", 2, [1.0, 1.0, 0.0]),  # spread 0, margin 1: main adds tanh(+inf) = 1
    ("ref:1", 1, [1.0, 0.5]),
    ("tied:2", 2, [1.0, 1.0, 1.0]),  # spread 0, margin 0: main adds 0 (0 / 0 = NaN -> 0)
    ("ref:2", 1, [0.0, 0.0]),
    ("tied:3", 2, [0.0, 0.0, 1.0]),  # spread 0, margin -1: main adds tanh(-inf) = -1
    ("ref:3", 1, [1.0, 0.0]),
]
ALLENAI_SPREAD_ZERO_TIES = {"0.1.4": 0.5846402758007582, "main": 0.5774100689501895}


@pytest.mark.parametrize("formula", ["0.1.4", "main"])
def test_ties_formulas_part_on_a_spread_zero_prompt_as_allenai_does(formula):
    scored = [ScoredRow("Ties", i, n, tuple(s)) for i, n, s in SPREAD_ZERO_TIES]
    score, details = ties_score(scored, formula)
    assert score == pytest.approx(ALLENAI_SPREAD_ZERO_TIES[formula], abs=1e-15)
    by_hand = {"0.1.4": math.tanh(2), "main": math.tanh(2) / 4}[formula]
    assert details["correctness_margin_score"] == pytest.approx(by_hand, abs=1e-15)
    assert score == pytest.approx(0.575 + 0.01 * by_hand, abs=1e-15)
    assert score == pytest.approx(reference_ties(SPREAD_ZERO_TIES, formula), abs=1e-15)
    assert (details["tied_accuracy"], details["ref_accuracy"]) == (0.5, 0.75)
    assert details["correctness_preferred"] == details["correctness_preferred_hard"] == 0.5
    result = score_benchmark(BENCHMARKS[REWARDBENCH2], scored, formula)
    assert result.subsets[0].score == score
    assert result.ties_formula == TIES_FORMULAS[formula] == result.to_dict()["ties_formula"]
    assert TIES_FORMULAS == {"0.1.4": "rewardbench 0.1.4", "main": "rewardbench main 05a9005"}


def test_ties_default_is_0_1_4_and_only_spread_zero_prompts_part_the_formulas():
    scored = [ScoredRow("Ties", i, n, tuple(s)) for i, n, s in SPREAD_ZERO_TIES]
    assert ties_score(scored) == ties_score(scored, "0.1.4")
    assert score_benchmark(BENCHMARKS[REWARDBENCH2], scored).ties_formula == "rewardbench 0.1.4"
    assert score_benchmark(BENCHMARKS[REWARDBENCH], []).ties_formula is None
    no_spread_zero = scored[:2]
    assert ties_score(no_spread_zero, "0.1.4") == ties_score(no_spread_zero, "main")
    # every tied prompt at spread 0: 0.1.4's margin term has no prompt left and is 0
    only_spread_zero = scored[2:]
    assert ties_score(only_spread_zero, "0.1.4")[1]["correctness_margin_score"] == 0.0
    assert ties_score(only_spread_zero, "main")[1]["correctness_margin_score"] == 0.0  # 1+0-1
    with pytest.raises(UserError, match="unknown Ties formula 'latest'.*0.1.4, main"):
        score_benchmark(BENCHMARKS[REWARDBENCH2], scored, "latest")


@pytest.mark.parametrize(
    "formula, allenai, margin_term",
    [
        # tanh terms of tied:0 and tied:1 (tied:2, tied:3 at spread 0 left out)
        ("0.1.4", 0.5481636729454756, (math.tanh(0.1 / 0.2 - 1) + math.tanh(-0.5 / 1.0 - 1)) / 2),
        # all four: tied:2 adds tanh(+inf) = 1, tied:3 0 / 0 -> 0
        ("main", 0.5540818364727379, (math.tanh(-0.5) + math.tanh(-1.5) + 1.0 + 0.0) / 4),
    ],
)
def test_ties_score_matches_the_reference_formula(formula, allenai, margin_term):
    """`allenai`: process_single_model of rewardbench 0.1.4 / main 05a9005 on these rows."""
    rows = [
        ("tied:0", 3, [2.0, 1.8, 1.9, 0.5, 0.4]),  # accurate, spread 0.2 < margin 1.3
        ("ref:0", 1, [1.0, 0.9, 0.2]),
        ("tied:1", 2, [1.0, 0.0, 0.5]),  # not accurate: a wrong answer beats a right one
        ("ref:1", 1, [3.0, 1.0]),
        ("tied:2", 2, [1.0, 1.0, 0.0]),  # spread 0: tanh(+inf) = 1
        ("ref:2", 1, [2.0, 1.5]),
        ("tied:3", 2, [1.0, 1.0, 1.0]),  # spread 0 and margin 0: NaN -> 0
        ("ref:3", 1, [0.0, 0.0]),
        ("tied:4", 2, [1.0, 0.5, 0.0]),  # no ref:4: counts in tied accuracy only
    ]
    scored = [ScoredRow("Ties", i, n, tuple(s)) for i, n, s in rows]
    score, details = ties_score(scored, formula)
    assert score == pytest.approx(reference_ties(rows, formula), abs=1e-12)
    assert score == pytest.approx(allenai, abs=1e-15)
    assert details["correctness_preferred_hard"] == pytest.approx(1 / 4)
    assert details["prompts"] == 4
    assert details["tied_accuracy"] == pytest.approx(3 / 5)
    assert details["ref_accuracy"] == pytest.approx(3 / 4)
    assert details["correctness_preferred"] == pytest.approx(2 / 4)
    assert details["correctness_margin_score"] == pytest.approx(margin_term, abs=1e-15)
    only_tied, _ = ties_score(scored[-1:])
    assert only_tied is None  # no prompt with both rows: no score
    with pytest.raises(UserError, match="tied:7 has one correct"):
        one = (1.0, 0.0)
        ties_score([ScoredRow("Ties", "tied:7", 1, one), ScoredRow("Ties", "ref:7", 1, one)])


def test_score_benchmark_counts_and_reports_apart():
    rows = [
        ScoredRow("alpacaeval-easy", "0", 1, (1.0, 0.0)),
        ScoredRow("alpacaeval-easy", "1", 1, (0.0, 0.0)),  # tie: wrong
        ScoredRow("alpacaeval-easy", "2", 1, None),  # too long: left out
        ScoredRow("hep-go", "3", 1, (2.0, 1.0)),
        ScoredRow("math-prm", "4", 1, None),  # every row too long: no score
        ScoredRow("my-own-subset", "5", 1, (1.0, 0.0)),
    ]
    result = score_benchmark(BENCHMARKS[REWARDBENCH], rows)
    easy, math_prm, go = result.subsets  # the benchmark's order
    assert (easy.rows, easy.scored, easy.too_long, easy.correct, easy.score) == (3, 2, 1, 1, 0.5)
    assert (go.section, go.score) == ("Reasoning", 1.0)
    assert (math_prm.too_long, math_prm.score) == (1, None)
    assert result.sections == {"Chat": 0.5, "Chat Hard": None, "Safety": None, "Reasoning": 1.0}
    assert result.score == 0.75 and not result.complete  # mean of the sections present
    assert [s.name for s in result.unknown_subsets] == ["my-own-subset"]
    assert result.unknown_subsets[0].score == 1.0
    assert len(result.missing_subsets) == 20 and "donotanswer" in result.missing_subsets


def test_rewardbench2_overall_is_the_mean_of_six_subsets():
    rows = []
    for i, name in enumerate(BENCHMARKS[REWARDBENCH2].subsets[:-1]):
        rows.append(ScoredRow(name, str(i), 1, (1.0, 0.0, 0.0, 0.0)))  # right: 1
        rows.append(ScoredRow(name, str(i), 1, (1.0, 1.0, 0.0, 0.0)))  # tie at the top: 1/2
        rows.append(ScoredRow(name, str(i), 1, (0.0, 1.0, 0.0, 0.0)))  # wrong: 0
    rows += [
        ScoredRow("Ties", "tied:0", 2, (2.0, 1.9, 0.0)),
        ScoredRow("Ties", "ref:0", 1, (1.0, 0.0)),
    ]
    result = score_benchmark(BENCHMARKS[REWARDBENCH2], rows)
    plain = [s.score for s in result.subsets[:-1]]
    assert plain == [0.5] * 5 and result.subsets[0].correct == 1.5
    ties = 0.3 + 0.3 + 0.2 + 0.2 + 0.01 * math.tanh(1.0 / 0.1 - 1)
    assert result.subsets[-1].score == pytest.approx(ties)
    assert result.score == pytest.approx((5 * 0.5 + ties) / 6) and result.complete
    assert result.sections == {}
