"""Every string-valued setting, as one ``str`` enum each, and the one parser that reads them.

Recipes, method parameters and function arguments take these as plain strings (a recipe's YAML holds
``rescale: l1``); ``parse_choice`` turns a string into the member, answering a typo with the closest
values (``rescale: l2`` -> "did you mean 'l1'?"). Method code compares members, never raw strings, so
an unknown value raises instead of silently taking the other branch. The members are ``str``
(``StrEnum``): they compare equal to their values, print as them, and serialize to JSON as them;
``repr`` is the value's too, so error messages read ``'l1'``. This module imports nothing of the
project, so methods, the input layer and the recipe schema can all use it.
"""

from __future__ import annotations

import difflib
from enum import StrEnum
from typing import TypeVar


class Choice(StrEnum):
    """Base of every choice enum: a ``str`` whose repr is the plain value."""

    def __repr__(self) -> str:
        return repr(self.value)


E = TypeVar("E", bound=Choice)


def parse_choice(kind: type[E], value: object, what: str, aliases: tuple[tuple[object, str], ...] = ()) -> E:
    """``value`` as a member of ``kind``; ValueError naming ``what``, the valid values and the closest one.

    aliases: other spellings, as (spelling, value) pairs, e.g. mergekit's ``(True, "l1")`` for
    ``rescale: true``; a spelling matches only a value of its own type (``1`` is not ``True``).
    """
    if isinstance(value, kind):
        return value
    for spelling, target in aliases:
        if type(spelling) is type(value) and spelling == value:
            return kind(target)
    if isinstance(value, str) and value in kind._value2member_map_:
        return kind(value)
    values = [m.value for m in kind]
    close = difflib.get_close_matches(str(value).lower(), values, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{what} must be one of {values}, got {value!r}{hint}")


# Method parameters ----------------------------------------------------------------------------------


class Sparsification(Choice):
    """How a task vector is thinned before merging (fixed by the method variant)."""

    none = "none"
    magnitude = "magnitude"  # keep the top-k |delta| (TIES trim)
    random = "random"  # keep each entry with probability density (DARE drop)
    magnitude_outliers = "magnitude_outliers"  # drop the top gamma and the smallest (breadcrumbs)
    della_magprune = "della_magprune"  # keep with probability rising with magnitude rank (DELLA)


class Rescale(Choice):
    """How kept entries are scaled back up after dropping."""

    none = "none"
    l1 = "l1"  # match the L1 norm of the undropped vector (mergekit)
    inverse_density = "inverse_density"  # divide by density (DARE paper, PEFT, MergeLM)


class Consensus(Choice):
    """TIES sign election (fixed by the method variant)."""

    none = "none"  # no election: plain weighted sum
    sum = "sum"  # elect the sign of the total mass (TIES, mergekit)
    count = "count"  # elect the majority sign (PEFT's "frequency")


class Election(Choice):
    """What the sign election votes with."""

    weighted = "weighted"  # w_i d_i (mergekit)
    unweighted = "unweighted"  # d_i (PEFT)


class Divisor(Choice):
    """The disjoint mean's divisor."""

    weights = "weights"  # sum of the agreeing weights (mergekit)
    count = "count"  # number of agreeing models (PEFT)


class TrimScope(Choice):
    """Over what the magnitude trim ranks |delta|."""

    tensor = "tensor"  # within each tensor (mergekit)
    model = "model"  # over the whole task vector (TIES paper)


class Remask(Choice):
    """Which mask a sparse soup keeps."""

    intersection = "intersection"  # nonzero in every model
    union = "union"  # nonzero in any model


class MetricKind(Choice):
    """What an MWA metric holds."""

    loss = "loss"  # lower is better
    step = "step"  # later is better


class FisherLabels(Choice):
    """Labels the Fisher is estimated with."""

    sampled = "sampled"  # drawn from the model: the true Fisher
    empirical = "empirical"  # the text's next tokens: the empirical Fisher


class Space(Choice):
    """What a method works on."""

    delta = "delta"  # task vectors M_i - B; the executor adds B back
    weight = "weight"  # the model weights themselves


# Recipe settings ------------------------------------------------------------------------------------


class DType(Choice):
    """Output dtype of a merge (computation is always float32)."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class TokenizerSource(Choice):
    """Vocabulary of the output when the inputs' differ (mergekit's key)."""

    base = "base"  # the base model's (else the first model's) tokenizer
    union = "union"  # it plus every other model's extra tokens


class OutOfRange(Choice):
    """What to do with a merged value the output dtype cannot hold (float16: |x| > 65504)."""

    refuse = "refuse"  # raise, naming the tensor
    clamp = "clamp"  # clamp to the largest finite value
