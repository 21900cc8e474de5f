"""The registered task-vector methods: settings of ``generalized_task_arithmetic``, not copies.

Names, parameters and defaults follow mergekit 0.1.5 ``merge_methods/registry.py`` (density defaults to 1;
mergekit's ``rescale: true`` is ``rescale="l1"`` here). The settings mergekit lacks (election, divisor,
rescale=inverse_density, trim_scope=model) are documented in ``task_arithmetic``.
"""

from __future__ import annotations

from functools import partial

from explorer.choices import (
    Consensus,
    Divisor,
    Election,
    Rescale,
    Space,
    Sparsification,
    TrimScope,
)
from explorer.methods.task_arithmetic import generalized_task_arithmetic
from explorer.methods.trim_scope import model_bands
from explorer.registry import MethodSpec, Param, register


def _params(
    sparsification: Sparsification, consensus: Consensus, normalize: bool, rescale: Rescale
) -> tuple[Param, ...]:
    """The params of one variant, with mergekit 0.1.5's defaults (density 1, rescale as its bool)."""
    params = [
        Param(
            "weight",
            1.0,
            "Scale of this model's task vector.",
            per_model=True,
            low=-2.0,
            high=2.0,
            step=0.05,
            slider_only=True,
        ),
        Param("lambda", 1.0, "Scale of the merged task vector.", low=0.0, high=3.0, step=0.05, slider_only=True),
        Param("normalize", normalize, "Divide by the (agreeing) weights."),
    ]
    if sparsification != Sparsification.none:
        params.append(
            Param("density", 1.0, "Fraction of task-vector entries kept.", per_model=True, low=0.0, high=1.0, step=0.01)
        )
        params.append(
            Param(
                "rescale",
                rescale,
                "Rescale kept entries: l1 norm (mergekit) or 1/density (DARE paper).",
                enum=Rescale,
                aliases=((True, "l1"), (False, "none")),
            )
        )
    if sparsification in _MAGNITUDE_RANKED:
        params.append(
            Param(
                "trim_scope",
                TrimScope.tensor,
                "Rank magnitudes per tensor (mergekit) or over the whole model (TIES paper).",
                enum=TrimScope,
            )
        )
    if sparsification == Sparsification.magnitude_outliers:
        params.append(
            Param(
                "gamma",
                0.01,
                "Fraction of largest-magnitude entries dropped as outliers.",
                per_model=True,
                low=0.0,
                high=0.5,
                step=0.005,
            )
        )
    if sparsification == Sparsification.della_magprune:
        params.append(
            Param(
                "epsilon",
                0.15,
                "Spread of keep probabilities around density.",
                per_model=True,
                low=0.0,
                high=0.5,
                step=0.01,
            )
        )
    if consensus != Consensus.none:
        params.append(
            Param(
                "election",
                Election.weighted,
                "Elect signs on weighted deltas (mergekit) or unweighted ones (PEFT).",
                enum=Election,
            )
        )
        params.append(
            Param(
                "divisor",
                Divisor.weights,
                "Disjoint-mean divisor: agreeing weights (mergekit) or agreeing count (PEFT).",
                enum=Divisor,
            )
        )
    return tuple(params)


_MAGNITUDE_RANKED = (
    Sparsification.magnitude,
    Sparsification.magnitude_outliers,
)  # the sparsifications trim_scope="model" applies to


def _variant(
    name: str, pretty: str, url: str, sparsification: str, consensus: str, normalize: bool, rescale: str, summary: str
) -> None:
    """Register one variant: the generalized method with ``sparsification`` and ``consensus`` fixed."""
    sparsification, consensus, rescale = Sparsification(sparsification), Consensus(consensus), Rescale(rescale)
    register(
        MethodSpec(
            name=name,
            pretty_name=pretty,
            paper_url=url,
            space=Space.delta,
            fn=partial(generalized_task_arithmetic, sparsification=sparsification, consensus=consensus),
            params=_params(sparsification, consensus, normalize, rescale),
            needs_base=True,
            summary=summary,
            prepare=model_bands if sparsification in _MAGNITUDE_RANKED else None,
        )
    )


# name, pretty name, paper, sparsification, consensus, normalize and rescale defaults (mergekit 0.1.5)
_DARE, _CRUMBS, _DELLA = (f"https://arxiv.org/abs/{i}" for i in ("2311.03099", "2312.06795", "2406.11617"))
_variant(
    "task_arithmetic",
    "Task Arithmetic",
    "https://arxiv.org/abs/2212.04089",
    "none",
    "none",
    False,
    "none",
    "B + lambda * sum_i w_i (M_i - B)",
)
_variant(
    "ties",
    "TIES",
    "https://arxiv.org/abs/2306.01708",
    "magnitude",
    "sum",
    True,
    "none",
    "Trim each task vector to its top-density magnitudes, elect signs, average the agreeing entries.",
)
_variant(
    "dare_linear",
    "Linear DARE",
    _DARE,
    "random",
    "none",
    False,
    "l1",
    "Drop task-vector entries with probability 1 - density, rescale, then task arithmetic.",
)
_variant(
    "dare_ties",
    "DARE TIES",
    _DARE,
    "random",
    "sum",
    False,
    "l1",
    "Drop task-vector entries with probability 1 - density, rescale, then TIES sign election.",
)
_variant(
    "breadcrumbs",
    "Model Breadcrumbs",
    _CRUMBS,
    "magnitude_outliers",
    "none",
    False,
    "none",
    "Drop the largest gamma and the smallest entries of each task vector, then task arithmetic.",
)
_variant(
    "breadcrumbs_ties",
    "Model Breadcrumbs with TIES",
    _CRUMBS,
    "magnitude_outliers",
    "sum",
    False,
    "none",
    "Breadcrumbs trimming, then TIES sign election.",
)
_variant(
    "della",
    "DELLA",
    _DELLA,
    "della_magprune",
    "sum",
    True,
    "l1",
    "Drop entries with probability falling with magnitude rank (density +/- epsilon), rescale, then TIES.",
)
_variant(
    "della_linear",
    "Linear DELLA",
    _DELLA,
    "della_magprune",
    "none",
    False,
    "l1",
    "DELLA's magnitude-ranked dropping, then task arithmetic.",
)
