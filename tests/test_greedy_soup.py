"""Greedy soup over callbacks: no models needed."""

from __future__ import annotations

import pytest

from explorer.greedy_soup import greedy_soup


def test_greedy_soup_follows_individual_order_and_keeps_non_decreasing_soups():
    table = {
        "a": 0.80,
        "b": 0.78,
        "c": 0.79,
        "d": 0.50,
        "ac": 0.79,
        "ab": 0.82,
        "abd": 0.82,
    }  # held-out score of each soup that gets tried
    result = greedy_soup(["a", "b", "c", "d"], score=lambda soup: table["".join(sorted(soup))])
    assert result.history == [("a", 0.80, True), ("c", 0.79, False), ("b", 0.82, True), ("d", 0.82, True)]
    assert result.ingredients == ["a", "b", "d"] and result.score == 0.82


def test_greedy_soup_accepts_ties_uses_given_scores_and_soup_callback():
    calls = []

    def soup(items):
        calls.append(list(items))
        return sum(items) / len(items)

    result = greedy_soup(
        [3.0, 1.0, 3.0], score=lambda avg: 1.0 if avg >= 2.5 else 0.0, soup=soup, individual_scores=[1.0, 0.0, 1.0]
    )
    assert result.ingredients == [3.0, 3.0]  # ties kept; 1.0 would drop the mean below 2.5
    assert calls == [[3.0, 3.0], [3.0, 3.0, 1.0]]  # N - 1 soups: individual scores were given


def test_greedy_soup_single_candidate_and_errors():
    only = greedy_soup(["x"], score=lambda soup: 0.3)
    assert only.ingredients == ["x"] and only.score == 0.3
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], score=lambda soup: 0.0)
    with pytest.raises(ValueError, match="2 individual scores"):
        greedy_soup(["x", "y", "z"], score=lambda soup: 0.0, individual_scores=[1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        greedy_soup(["x", "y"], score=lambda soup: float("nan"))
