"""Combinations: several tuners trained together, named by joining their names with ``+``.

    essa.tuners.apply(model, "apla+lora", apla={"r": 64}, lora={"targets": ["qkv"]})

A combination is a :class:`Tuner` whose options are a mapping per part (``{"apla": {"r": 64}, "lora": {...}}``; a
part left out takes its defaults). Its parts are injected in the order of the name, each on the model as the earlier
parts left it, and folded in the same order (an earlier part's modules sit inside a later part's wrappers: SSF's
scale on a linear layer folds into that layer before LoRA's wrapper merges its update into it).

Each part is injected alone on a frozen model and what it did is compared with what the earlier parts did, so a
combination is refused, naming the parameter or module, when

* two parts train the same parameter (``apla+bitfit``: both train ``blocks.0.attn.proj.bias``);
* a part replaces or wraps a module that an earlier part put there, or trains or adds parameters inside it (LoRA on
  ``attn.proj`` after APLA with ``r < d`` turned it into an ``APLAProjection``; BitFit training that module's bias);
* a part replaces a module holding parameters an earlier part trains, which would drop them (``bitfit+apla``);
* a part wraps, or adds parameters to, a module whose weight an earlier part already trains in full (``apla+lora``
  with LoRA on ``attn.proj`` and APLA training the whole projection): that update adds nothing;
* a part would not train everything it trains alone, because an earlier part replaced modules it adapts
  (``apla+ssf`` with ``r < d``: SSF finds no linear layer at ``attn.proj`` any more);
* a part trains nothing in the backbone (``linear``), or every parameter (``full``).

The checks compare what each part does, not names of tuners. They run first on a copy of the model on the meta
device (:meth:`Combination.check`, no memory), so a refused combination leaves the model as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from essa.tuners import base
from essa.tuners.base import COMBINE as SEPARATOR, REGISTRY, Tuner, TunerError, kind as _kind


def part_names(name: str) -> list[str]:
    """``"apla+lora"`` -> ``["apla", "lora"]``, refusing empty, unknown or repeated parts."""
    parts = [part.strip() for part in name.split(SEPARATOR)]
    if not all(parts):
        raise TunerError(f"tuner {name!r} has an empty part; join registered tuner names with {SEPARATOR!r}, "
                         f"e.g. apla+lora; valid parts: {', '.join(sorted(REGISTRY))}")
    for part in parts:
        if part not in REGISTRY:
            raise TunerError(f"tuner {name!r}: unknown part {part!r}; valid parts: {', '.join(sorted(REGISTRY))}")
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise TunerError(f"tuner {name!r} names {repeated[0]!r} twice; a combination has each tuner once")
    return parts


def build_combination(name: str, options: dict[str, Any]) -> "Combination":
    """A combination from its ``+`` name and its options by part (``{"apla": {"r": 64}}``)."""
    parts = part_names(name)
    if not isinstance(options, dict):
        raise TunerError(f"tuner {name!r}: options must be a mapping by part, got {options!r}")
    unknown = [key for key in options if key not in parts]
    if unknown:
        raise TunerError(
            f"tuner {name!r} takes its options by part ({', '.join(parts)}), e.g. {{{parts[0]!r}: {{...}}}}; "
            f"{unknown[0]!r} is not one of its parts"
        )
    built = []
    for part in parts:
        opts = options.get(part)
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise TunerError(f"tuner {name!r}: the options of {part!r} must be a mapping, got {opts!r}")
        built.append(base.build(part, opts))
    return Combination(tuple(built))


base.COMBINATIONS[:] = [build_combination]


def option_words(options: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"apla": {"r": 64}}`` -> ``["apla.r=64"]``: options as ``key=value`` words, a combination's by part, as
    ``--tuner-opt`` takes them."""
    out = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += option_words(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def label(name: str, options: dict[str, Any]) -> str:
    """A readable label: ``"apla r=64 + lora targets=['qkv']"`` (parts without options: their name)."""
    parts = [part.strip() for part in name.split(SEPARATOR)]
    words = []
    for part in parts:
        opts = options.get(part) if isinstance(options, dict) else None
        words.append(" ".join([part, *(f"{k}={v}" for k, v in (opts or {}).items())]))
    return " + ".join(words)


@dataclasses.dataclass
class Combination(Tuner):
    """Several tuners trained together; ``parts`` in injection (and folding) order."""

    parts: tuple[Tuner, ...]

    @property
    def name(self) -> str:
        return SEPARATOR.join(part.name for part in self.parts)

    @property
    def mergeable(self) -> bool:
        return all(part.mergeable for part in self.parts)

    def options(self) -> dict[str, Any]:
        return {part.name: part.options() for part in self.parts}

    def check(self, model):
        """Inject the parts into a copy of ``model`` on the meta device: a refusal leaves ``model`` untouched."""
        _inject_parts(self.parts, _meta_copy(model).requires_grad_(False))

    def inject(self, model):
        _inject_parts(self.parts, model)

    def fold(self, model):
        for part in self.parts:
            part.fold(model)

    def extra_state(self, model):
        state = {}
        for part in self.parts:
            state.update(part.extra_state(model))
        return state


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are empty tensors on the meta device."""
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _inject_parts(parts: tuple[Tuner, ...], model: nn.Module) -> None:
    """Inject ``parts`` in order, refusing overlaps (see the module docstring); afterwards exactly the parameters
    the parts train require gradients."""
    alone = {}  # part -> the names of the parameters it trains when applied alone
    for part in parts if len(parts) > 1 else ():
        copy_ = _meta_copy(model).requires_grad_(False)
        part.inject(copy_)
        alone[part.name] = {n for n, p in copy_.named_parameters() if p.requires_grad}
    trained: dict[int, tuple[str, str]] = {}  # id(parameter) -> (part, parameter name when it was trained)
    owned: dict[int, tuple[str, str, str]] = {}  # id(module) -> (part, name, type) of the module a part put there
    for part in parts:
        modules_before = dict(model.named_modules())
        params_before = {id(p): n for n, p in model.named_parameters()}
        model.requires_grad_(False)
        part.inject(model)
        modules_after = dict(model.named_modules())
        params_after = dict(model.named_parameters())
        owner = {id(p): (mname, m) for mname, m in modules_after.items() for p in m._parameters.values()
                 if p is not None}
        mine = {id(p): n for n, p in params_after.items() if p.requires_grad}
        replaced = [n for n, m in modules_before.items() if modules_after.get(n) is not m]

        for pid, pname in mine.items():  # the same parameter twice
            if pid in trained:
                raise TunerError(f"{part.name} and {trained[pid][0]} both train {pname}: a combination trains each "
                                 "parameter once; leave one of them out")
        present = {id(p) for p in params_after.values()}
        for pid, (earlier, pname) in trained.items():  # a replacement drops an earlier part's parameter
            if pid not in present:
                module = min((n for n in replaced if pname.startswith(n + ".")), key=len, default=None)
                where = f"replaces {module}" if module is not None else "removes the module of"
                raise TunerError(f"{part.name} {where}, dropping {pname}, which {earlier} trains")
        for n in replaced:  # replacing or wrapping what an earlier part put there
            if id(modules_before[n]) in owned:
                earlier, root, kind = owned[id(modules_before[n])]
                raise TunerError(f"{part.name} would replace or wrap {n}, which {earlier} replaced with its own "
                                 f"{kind}" + ("" if root == n else f" (at {root})"))
        new = {pid for pid in present if pid not in params_before}
        for pname, p in params_after.items():  # training or adding parameters inside an earlier part's module
            if id(p) in mine or id(p) in new:
                module = owner[id(p)][1]
                if id(module) in owned:
                    earlier, root, kind = owned[id(module)]
                    raise TunerError(f"{part.name} would {'train' if id(p) in mine else 'add'} {pname} inside "
                                     f"{root}, the {kind} that {earlier} put there")
        adapted = [(n, modules_before[n]) for n in replaced]
        objects_before = {id(m) for m in modules_before.values()}
        adapted += [owner[id(p)] for p in params_after.values() if id(p) in new and id(owner[id(p)][1]) in
                    objects_before]
        for n, module in adapted:  # adapting a weight that an earlier part trains in full
            weight = module._parameters.get("weight")
            if weight is not None and id(weight) in trained:
                raise TunerError(f"{part.name} adapts {n}, whose weight {trained[id(weight)][0]} already trains in "
                                 f"full ({trained[id(weight)][1]}): the update would add nothing")
        if part.name in alone:  # an earlier part changed what this one finds to adapt
            here = set(mine.values())  # (no renaming to undo: training inside an earlier part's module is refused)
            lost = sorted(n for n in alone[part.name] if n not in here)
            if lost:
                earlier = ", ".join(p.name for p in parts[:parts.index(part)])
                raise TunerError(f"{part.name} trains {lost[0]} when applied alone but not after {earlier}, which "
                                 f"replaced that module ({len(lost)} such parameters); a combination does not drop "
                                 "a part's parameters")
        if not mine:
            raise TunerError(f"{part.name} trains nothing in the backbone, so it adds nothing to a combination; "
                             "leave it out")
        if len(parts) > 1 and set(params_before) <= set(mine):
            raise TunerError(f"{part.name} trains every parameter of the model, so nothing is left for the other "
                             f"parts of {SEPARATOR.join(p.name for p in parts)}; train it alone")

        roots = [n for n in replaced if n in modules_after]
        roots += [n for n, m in modules_after.items() if id(m) not in objects_before]
        for root in roots:  # pre-order: a module inside another root keeps the outer one
            kind = _kind(modules_after[root])
            for n, m in modules_after.items():
                if n == root or n.startswith(root + "."):
                    owned.setdefault(id(m), (part.name, root, kind))
        trained.update({pid: (part.name, pname) for pid, pname in mine.items()})
        for p in params_after.values():
            if id(p) in trained:
                p.requires_grad_(True)
