"""The integrity gates and context fitting, on their own (pure functions, no server)."""

from __future__ import annotations

import pytest

from prowzi.agents.models import Source
from prowzi.llm.agents import fit_sources
from prowzi.llm.gates import SUPPORT_THRESHOLD, gate_section, renumber, support

QUBITS = Source(
    source_id="q",
    title="Qubits",
    authors=["Ada Lovelace"],
    year=2020,
    abstract="Quantum computers store information in qubits that hold superposed states. "
    "Decoherence destroys those states within microseconds.",
)


@pytest.mark.parametrize(
    ("text", "kept", "dropped", "count"),
    [
        pytest.param(
            "## A heading\nQuantum computers store information in qubits [1, 7]. "
            "Smith showed otherwise (Smith, 2019). Lovelace agrees (Lovelace, 2020) [1].\n\n"
            "References\n[1] Lovelace, Qubits.\n[7] Invented, 2031.",
            "Quantum computers store information in qubits [1]. Smith showed otherwise. "
            "Lovelace agrees (Lovelace, 2020) [1].",
            "citations_dropped",
            1 + 1 + 2,  # [7], (Smith, 2019), two list entries
            id="unknown-numbers-author-year-inventions-and-reference-lists",
        ),
        pytest.param(
            'As put, "Decoherence destroys those states within microseconds" [1]. '
            'Also "qubits never decohere" [1]. '
            'Uncited, "store information in qubits" is quoted.',
            'As put, "Decoherence destroys those states within microseconds" [1].',
            "quotes_dropped",
            2,
            id="quotes-not-verbatim-in-a-cited-source",
        ),
    ],
)
def test_the_gates_drop_what_the_sources_do_not_back(
    text: str, kept: str, dropped: str, count: int
) -> None:
    gated, report = gate_section(text, {1: QUBITS})
    assert gated == kept
    assert getattr(report, dropped) == count


def test_support_below_the_threshold_is_reported_not_removed() -> None:
    text = (
        "Bananas ripen faster beside apples in warm kitchens [1]. "
        "Qubits hold superposed states [1]."
    )
    gated, report = gate_section(text, {1: QUBITS})
    assert gated == text
    assert report.unsupported_citations == 1 and report.supported_citations == 1
    assert support("Bananas ripen faster beside apples", [QUBITS]) < SUPPORT_THRESHOLD
    assert renumber("A [1]. B [1, 2].", {1: 3, 2: 1}) == "A [3]. B [1, 3]."


def test_sources_are_fitted_to_the_budget_in_whole_sentences() -> None:
    long = Source(
        source_id="long",
        title="Long",
        abstract=" ".join(f"Sentence number {i} says something about qubits." for i in range(400)),
    )
    numbered, text = fit_sources([QUBITS, long], budget_tokens=200)
    assert set(numbered) == {1, 2}
    assert len(text) // 4 <= 200
    body = text.split("[2] Long (unknown authors)\n", 1)[1]
    assert body.endswith("qubits.") and body.startswith("Sentence number 0 says")
