"""Routing: rules on DICOM attributes decide which model analyses which series, and record why others are skipped.

The rules live in a YAML file (triage/pipelines/routing.yaml by default, `TRIAGE_ROUTING_RULES` to override),
so a site changes routing without touching code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from triage.domain import RoutingDecision, SeriesInfo, SkipReason
from triage.errors import TriageError
from triage.models.intended_use import UseCheck

_MATCH_KEYS = {
    "modality",
    "sop_class",
    "text_any",
    "image_type_any",
    "image_type_none",
    "kernel",
    "view_position",
    "slice_thickness_mm",
    "min_instances",
}
_TEXT_ATTRIBUTES = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")


@dataclass(frozen=True)
class Match:
    """A conjunction of attribute conditions; an absent condition always holds."""

    conditions: dict[str, Any]

    def failures(self, series: SeriesInfo) -> list[str]:
        """The conditions this series fails, in words (empty: it matches)."""
        attrs = series.attributes
        failed: list[str] = []
        c = self.conditions
        if "modality" in c and series.modality.upper() not in {m.upper() for m in c["modality"]}:
            failed.append(f"modality {series.modality!r} not in {c['modality']}")
        if "sop_class" in c and series.sop_class_uid not in set(c["sop_class"]):
            failed.append(f"SOP class {series.sop_class_uid} not routed")
        if "text_any" in c:
            text = " ".join(str(attrs.get(a) or "") for a in _TEXT_ATTRIBUTES)
            if not re.search(c["text_any"], text):
                failed.append("body part / descriptions do not match")
        image_type = {str(v).upper() for v in (attrs.get("ImageType") or [])}
        if "image_type_any" in c and not image_type & {v.upper() for v in c["image_type_any"]}:
            failed.append(f"ImageType has none of {c['image_type_any']}")
        if "image_type_none" in c and image_type & {v.upper() for v in c["image_type_none"]}:
            failed.append(f"ImageType has one of {c['image_type_none']}")
        if "kernel" in c:
            kernel = str(attrs.get("ConvolutionKernel") or "")
            if not kernel or not re.search(c["kernel"], kernel):
                failed.append(f"kernel {kernel!r} does not match")
        if "view_position" in c:
            view = str(attrs.get("ViewPosition") or "").upper()
            if view not in {v.upper() for v in c["view_position"]}:
                failed.append(f"view position {view!r} not in {c['view_position']}")
        if "slice_thickness_mm" in c:
            low, high = c["slice_thickness_mm"]
            thickness = _as_float(attrs.get("SliceThickness"))
            if thickness is None or not low <= thickness <= high:
                failed.append(f"slice thickness {thickness} mm outside [{low}, {high}] mm")
        if "min_instances" in c:
            count = max(series.n_instances, int(_as_float(attrs.get("NumberOfFrames")) or 0))
            if count < c["min_instances"]:
                failed.append(f"{count} images, fewer than {c['min_instances']}")
        return failed


@dataclass(frozen=True)
class Exclusion:
    reason: str
    match: Match


@dataclass(frozen=True)
class Rule:
    name: str
    model: str
    match: Match
    prefer: str = "first"


@dataclass
class RoutingRules:
    """The parsed rules file."""

    exclusions: list[Exclusion] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> RoutingRules:
        """Read and check a rules file.

        Raises:
            TriageError: when the file is missing, not YAML, or uses an unknown match key (quoted).
        """
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TriageError(f"cannot read routing rules {path}: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> RoutingRules:
        def match_of(entry: dict[str, Any]) -> Match:
            conditions = dict(entry.get("match") or {})
            unknown = set(conditions) - _MATCH_KEYS
            if unknown:
                raise TriageError(f"{source}: unknown match key(s) {sorted(unknown)}; valid: {sorted(_MATCH_KEYS)}")
            return Match(conditions)

        exclusions = [Exclusion(str(e["reason"]), match_of(e)) for e in raw.get("exclude") or []]
        rules = [
            Rule(str(r["name"]), str(r["model"]), match_of(r), str(r.get("prefer", "first")))
            for r in raw.get("rules") or []
        ]
        return cls(exclusions, rules)


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _rank_key(rule: Rule, series: SeriesInfo) -> tuple[float, ...]:
    if rule.prefer == "thinnest":
        thickness = _as_float(series.attributes.get("SliceThickness")) or 1e9
        return (thickness, -series.n_instances)
    return (0.0,)


def _routed_modalities(rules: RoutingRules) -> set[str] | None:
    """The modalities some rule can route, upper case; None when a rule has no modality condition (any)."""
    modalities: set[str] = set()
    for rule in rules.rules:
        if "modality" not in rule.match.conditions:
            return None
        modalities |= {str(m).upper() for m in rule.match.conditions["modality"]}
    return modalities


def _unrouted_reason(series: SeriesInfo, rules: RoutingRules, near_misses: list[str]) -> str:
    """Why no rule routed `series`: "no model for MR: ..." when no rule takes its modality at all (the text the
    worklist shows before the first colon), else "no-rule-matched: <each rule's first failed condition>"."""
    detail = "; ".join(near_misses) if near_misses else "no rules configured"
    routed = _routed_modalities(rules)
    modality = series.modality.strip().upper()
    if routed is not None and modality not in routed:
        shown = modality or "an unknown modality"
        handled = ", ".join(sorted(routed)) or "none"
        return f"no model for {shown}: no routing rule takes modality {shown} (rules exist for {handled})"
    return f"{SkipReason.NO_RULE}: {detail}"


def route_study(
    series_list: Sequence[SeriesInfo],
    rules: RoutingRules,
    installed_models: set[str],
    admit: Callable[[str, SeriesInfo], UseCheck | None] | None = None,
) -> list[RoutingDecision]:
    """Decide, for every series of a study, which model analyses it or why none does.

    Each model analyses at most one series per study (the best ranked by its rule); other candidates are recorded
    as skipped with the series that was chosen instead. With `admit` (the model's card's intended-use check), a
    series a rule matches but the model was not made for is skipped with the card's reason in words, before the
    candidates compete (a lateral film never displaces the frontal one), and what was assumed for missing header
    attributes is added to the chosen series' reason. Returns one decision per series, in input order.
    """
    decisions: dict[str, RoutingDecision] = {}
    candidates: dict[str, list[tuple[Rule, SeriesInfo]]] = {}
    assumed: dict[str, list[str]] = {}
    for series in series_list:
        excluded = next((e for e in rules.exclusions if not e.match.failures(series)), None)
        if excluded is not None:
            decisions[series.series_uid] = RoutingDecision(series_uid=series.series_uid, reason=excluded.reason)
            continue
        near_misses: list[str] = []
        refused: RoutingDecision | None = None
        for rule in rules.rules:
            failed = rule.match.failures(series)
            if failed:
                near_misses.append(f"{rule.name}: {failed[0]}")
                continue
            check = admit(rule.model, series) if admit is not None and rule.model in installed_models else None
            if check is not None and not check.ok:
                refused = refused or RoutingDecision(
                    series_uid=series.series_uid,
                    rule=rule.name,
                    reason=f"{SkipReason.OUTSIDE_INTENDED_USE}: {check.text()}",
                )
                continue
            if check is not None and check.assumptions:
                assumed[series.series_uid] = check.assumptions
            candidates.setdefault(rule.model, []).append((rule, series))
            break
        else:
            decisions[series.series_uid] = refused or RoutingDecision(
                series_uid=series.series_uid, reason=_unrouted_reason(series, rules, near_misses)
            )
    for model, pairs in candidates.items():
        ranked = sorted(pairs, key=lambda pair: _rank_key(pair[0], pair[1]))
        chosen_rule, chosen = ranked[0]
        if model not in installed_models:
            for rule, series in ranked:
                decisions[series.series_uid] = RoutingDecision(
                    series_uid=series.series_uid,
                    rule=rule.name,
                    reason=f"{SkipReason.MODEL_UNAVAILABLE}: {model} is not installed",
                )
            continue
        notes = "".join(f"; {note}" for note in assumed.get(chosen.series_uid, []))
        decisions[chosen.series_uid] = RoutingDecision(
            series_uid=chosen.series_uid,
            model=model,
            rule=chosen_rule.name,
            reason=f"matched rule {chosen_rule.name}{notes}",
        )
        for rule, series in ranked[1:]:
            decisions[series.series_uid] = RoutingDecision(
                series_uid=series.series_uid,
                rule=rule.name,
                reason=f"{model} analyses series {chosen.series_uid} instead",
            )
    return [decisions[s.series_uid] for s in series_list]
