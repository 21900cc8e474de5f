"""Parameter values of a recipe as mergekit writes them: scalars, gradients and filtered lists.

A setting is one of

    0.5                                   a scalar (number, bool or choice string)
    [0, 0.3, 1]                           a gradient: interpolated linearly over the layer index
    {filter: mlp, value: 0.7}             a conditional value (``value`` may be a gradient)
    [{filter: self_attn, value: [0, 1]},  a filtered list: the first entry whose ``filter`` is a
     {filter: mlp, value: [1, 0]},        substring of the tensor name wins; an entry without filter
     {value: 0.5}]                        (or with ``*``) matches every tensor

``evaluate`` gives the value for one tensor name at position ``t`` in [0, 1] along the layers, with
the meaning of mergekit 0.1.5's ``mergekit.config.evaluate_setting``: a numeric gradient of k values
puts them at t = 0, 1/(k-1), ..., 1 and interpolates linearly between neighbours; a gradient of bools
or strings takes the value at index int(t * (k - 1)); a filtered list where nothing matches gives None
(the next, lower-precedence setting applies, then the method's default). Where ``t`` comes from (the
layer's place in its slice, 0 for embeddings and head) is ``explorer.recipe_layout``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict

from explorer.registry import ParamValue

Gradient = list[ParamValue]


class Conditional(BaseModel):
    """One entry of a filtered list: ``value`` for tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")

    value: Union[ParamValue, Gradient]
    filter: Optional[str] = None  # a substring of the tensor name; None or "*" matches every tensor


ParamSetting = Union[ParamValue, Gradient, Conditional, list[Conditional]]


def evaluate(setting: ParamSetting, name: str, t: float, check: Callable[[Any], Any]) -> Any:
    """The value of ``setting`` for tensor ``name`` at layer position ``t`` (0..1), or None.

    ``check`` validates and coerces one value (e.g. ``Param.check``): it is applied to every endpoint
    of a gradient and to the interpolated result, as mergekit validates both. Returns None for an
    empty list or a filtered list with no matching entry. Raises what ``check`` raises.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return check(setting)
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        entry = next((c for c in setting if matches(c.filter, name)), None)
        return None if entry is None else evaluate(entry.value, name, t, check)
    return _gradient([check(v) for v in setting], t, check)


def _gradient(values: list, t: float, check: Callable[[Any], Any]) -> Any:
    """Value at ``t`` of a gradient: linear between neighbouring numbers, else the value at int(t * (k-1))."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return check((1 - frac) * values[low] + frac * values[high])


def matches(filter_: Optional[str], name: str) -> bool:
    """True when a conditional with ``filter_`` applies to tensor ``name`` (substring; None or ``*``: all)."""
    return filter_ is None or filter_ == "*" or bool(name and filter_ in name)


def leaves(setting: ParamSetting) -> Iterator[ParamValue]:
    """Every scalar written in ``setting`` (gradient endpoints, each conditional's values)."""
    if isinstance(setting, Conditional):
        yield from leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from leaves(item)
    else:
        yield setting


def is_scalar(setting: ParamSetting) -> bool:
    """True when ``setting`` is one value for every tensor (no gradient, no filter)."""
    return not isinstance(setting, (list, Conditional))
