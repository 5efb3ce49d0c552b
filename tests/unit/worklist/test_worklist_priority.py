"""Golden tables for the priority policy: clinical floor, AI findings that only raise, promotion by waiting time, and
the order (minutes waited plus head start)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from triage.config import PrioritySettings
from triage.domain import AIStatus, Finding, PriorityLevel
from triage.worklist.priority import (
    HEAD_START_MIN,
    LONG_WAIT_MIN,
    base_level,
    compute_priority,
    priority_to_dict,
    sort_key,
    validate_settings,
)

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
SETTINGS = PrioritySettings(
    finding_levels={
        "intracranial_haemorrhage": "stat",
        "fracture": "urgent",
        "nodule": "routine",
        "pneumothorax": "stat",
    },
    turnaround_min={"stat": 60, "urgent": 240, "routine": 1440},
    promote_at_fraction=0.75,
)
ROUTINE, URGENT, STAT = PriorityLevel.ROUTINE, PriorityLevel.URGENT, PriorityLevel.STAT


def finding(
    label: str, probability: float = 0.9, flagged: bool = True, synthetic: bool = False, model: str = "ct-head-ich"
) -> Finding:
    # Active at the site (shadow=False said explicitly: a synthetic model's finding is shadow unless said otherwise).
    return Finding(
        label=label, probability=probability, flagged=flagged, model=model, model_version="1.2.0", synthetic=synthetic,
        shadow=False,
    )  # fmt: skip


ICH, FRACTURE, NODULE = finding("intracranial_haemorrhage"), finding("fracture"), finding("nodule")
# A flag from a model in shadow at the study's site (its card says synthetic: not validated there), and the same
# model's flag at a site that activated it on a local validation report.
SYNTH_PTX = finding("pneumothorax", 0.97, synthetic=True, model="xr-chest-pneumothorax").model_copy(
    update={"shadow": True}
)
ACTIVE_SYNTH_PTX = finding("pneumothorax", 0.97, synthetic=True, model="xr-chest-pneumothorax")
SHADOW_ICH = finding("intracranial_haemorrhage", 0.95, model="ct-head-ich").model_copy(update={"shadow": True})

# id, clinical, findings, AI status, minutes waited -> expected level, expected reason codes in order
GOLDEN = [
    ("routine-pending", ROUTINE, [], "pending", 0, ROUTINE, ["clinical", "ai-pending"]),
    ("stat-request-pending", STAT, [], "pending", 0, STAT, ["clinical", "ai-pending"]),
    ("analysing-keeps-clinical", URGENT, [], "analysing", 10, URGENT, ["clinical", "ai-pending"]),
    ("ich-raises-routine-to-stat", ROUTINE, [ICH], "done", 5, STAT, ["clinical", "ai-finding"]),
    ("fracture-raises-routine-to-urgent", ROUTINE, [FRACTURE], "done", 5, URGENT, ["clinical", "ai-finding"]),
    (
        "unflagged-leaves-level",
        URGENT,
        [finding("intracranial_haemorrhage", 0.2, False)],
        "done",
        5,
        URGENT,
        ["clinical", "ai-negative"],
    ),
    ("no-findings-leaves-level", STAT, [], "done", 5, STAT, ["clinical", "ai-negative"]),
    ("finding-below-floor-does-not-lower", URGENT, [NODULE], "done", 5, URGENT, ["clinical", "ai-finding-kept"]),
    ("urgent-finding-below-stat-floor", STAT, [FRACTURE], "done", 5, STAT, ["clinical", "ai-finding-kept"]),
    ("failure-keeps-routine", ROUTINE, [], "failed", 5, ROUTINE, ["clinical", "ai-failed"]),
    ("failure-never-lowers-stat", STAT, [], "failed", 5, STAT, ["clinical", "ai-failed"]),
    ("failure-never-lowers-urgent", URGENT, [], "failed", 5, URGENT, ["clinical", "ai-failed"]),
    ("not-applicable-keeps-clinical", URGENT, [], "not-applicable", 5, URGENT, ["clinical", "ai-not-applicable"]),
    ("two-findings-highest-wins", ROUTINE, [FRACTURE, ICH], "done", 5, STAT, ["clinical", "ai-finding", "ai-finding"]),
    (
        "second-lower-finding-kept",
        ROUTINE,
        [ICH, FRACTURE],
        "done",
        5,
        STAT,
        ["clinical", "ai-finding", "ai-finding-kept"],
    ),
    (
        "unmapped-finding-named-not-raised",
        ROUTINE,
        [finding("atelectasis")],
        "done",
        5,
        ROUTINE,
        ["clinical", "ai-finding-unmapped"],
    ),
    (
        "earlier-findings-count-while-requeued",
        ROUTINE,
        [ICH],
        "pending",
        5,
        STAT,
        ["clinical", "ai-pending", "ai-finding"],
    ),
    # Promotion once promote_at_fraction (0.75) of the current level's target has elapsed. Past LONG_WAIT_MIN (120)
    # a study below stat is also ordered with the stat head start ("long-wait", listed before the promotion its
    # target brings later); its level stays.
    ("routine-just-before-promotion", ROUTINE, [], "pending", 1079, ROUTINE, ["clinical", "ai-pending", "long-wait"]),
    (
        "routine-promoted-at-fraction",
        ROUTINE,
        [],
        "pending",
        1080,
        URGENT,
        ["clinical", "ai-pending", "long-wait", "waiting-promoted"],
    ),
    ("routine-just-before-long-wait", ROUTINE, [], "done", 119, ROUTINE, ["clinical", "ai-negative"]),
    ("routine-long-wait-keeps-level", ROUTINE, [], "done", 120, ROUTINE, ["clinical", "ai-negative", "long-wait"]),
    ("urgent-long-wait-keeps-level", URGENT, [], "done", 150, URGENT, ["clinical", "ai-negative", "long-wait"]),
    ("urgent-promoted-at-fraction", URGENT, [], "pending", 180, STAT, ["clinical", "ai-pending", "waiting-promoted"]),
    (
        "routine-overdue-promoted-one-level-only",
        ROUTINE,
        [],
        "done",
        2000,
        URGENT,
        ["clinical", "ai-negative", "long-wait", "waiting-promoted", "overdue"],
    ),
    ("stat-never-above-stat", STAT, [], "pending", 45, STAT, ["clinical", "ai-pending"]),
    ("stat-overdue-stays-stat", STAT, [], "pending", 61, STAT, ["clinical", "ai-pending", "overdue"]),
    (
        "promotion-uses-level-after-ai",
        ROUTINE,
        [FRACTURE],
        "done",
        180,
        STAT,
        ["clinical", "ai-finding", "waiting-promoted"],
    ),
    ("ai-stat-not-promoted-further", ROUTINE, [ICH], "done", 50, STAT, ["clinical", "ai-finding"]),
    (
        "failed-study-still-promoted",
        ROUTINE,
        [],
        "failed",
        1100,
        URGENT,
        ["clinical", "ai-failed", "long-wait", "waiting-promoted"],
    ),
    # Shadow models (synthetic-data models start so): their flags raise nothing and are no reason.
    ("shadow-flag-does-not-raise", ROUTINE, [SYNTH_PTX], "done", 5, ROUTINE, ["clinical", "ai-shadow-only"]),
    ("shadow-flag-under-urgent", URGENT, [SYNTH_PTX], "done", 5, URGENT, ["clinical", "ai-shadow-only"]),
    (
        "shadow-flag-beside-real-finding",
        ROUTINE,
        [SYNTH_PTX, FRACTURE],
        "done",
        5,
        URGENT,
        ["clinical", "ai-finding"],
    ),
    (
        "shadow-flag-still-promoted-by-waiting",
        ROUTINE,
        [SYNTH_PTX],
        "done",
        1080,
        URGENT,
        ["clinical", "ai-shadow-only", "long-wait", "waiting-promoted"],
    ),
    (
        "shadow-flag-while-requeued",
        ROUTINE,
        [SYNTH_PTX],
        "pending",
        5,
        ROUTINE,
        ["clinical", "ai-pending"],
    ),
    (
        "synthetic-unflagged-is-negative",
        ROUTINE,
        [finding("pneumothorax", 0.1, False, synthetic=True, model="xr-chest-pneumothorax")],
        "done",
        5,
        ROUTINE,
        ["clinical", "ai-negative"],
    ),
]


@pytest.mark.parametrize(
    ("clinical", "findings", "status", "waited_min", "level", "codes"),
    [pytest.param(*row[1:], id=row[0]) for row in GOLDEN],
)
def test_golden_table(clinical, findings, status, waited_min, level, codes):
    priority = compute_priority(clinical, findings, status, T0, T0 + timedelta(minutes=waited_min), SETTINGS)
    assert priority.level is level
    assert [r.code for r in priority.reasons] == codes
    # Whatever happens, the clinical priority is the floor.
    assert priority.level.rank >= clinical.rank


def test_clinical_reason_names_level_and_source():
    priority = compute_priority(STAT, [], "pending", T0, T0, SETTINGS)
    assert priority.reasons[0].text == "clinical priority: stat (from request)"
    default = compute_priority(ROUTINE, [], "pending", T0, T0, SETTINGS, clinical_source="default")
    assert default.reasons[0].text == "clinical priority: routine (default)"


def test_failure_reason_quotes_the_failure_and_keeps_clinical():
    priority = compute_priority(URGENT, [], AIStatus.FAILED, T0, T0, SETTINGS, ai_reason="onnxruntime: bad shape")
    failed = priority.reasons[1]
    assert failed.text == "AI analysis failed: onnxruntime: bad shape; clinical priority kept"
    assert failed.level is URGENT


def test_finding_reason_names_finding_probability_model_version_and_synthetic():
    text = compute_priority(ROUTINE, [ACTIVE_SYNTH_PTX], "done", T0, T0, SETTINGS).reasons[1].text
    for part in ("pneumothorax", "p=0.97", "xr-chest-pneumothorax", "1.2.0", "synthetic model", "stat"):
        assert part in text
    real = compute_priority(ROUTINE, [finding("fracture", synthetic=False)], "done", T0, T0, SETTINGS)
    assert "synthetic" not in real.reasons[1].text


# A shadow finding is left out of the priority and of its reasons: the worklist is as if its model had not run.
# id, findings -> expected level, expected reason codes
SHADOW_GOLDEN = [
    ("shadow-flag-raises-nothing", [SYNTH_PTX], ROUTINE, ["clinical", "ai-shadow-only"]),
    ("active-synthetic-model-raises", [ACTIVE_SYNTH_PTX], STAT, ["clinical", "ai-finding"]),
    ("shadow-real-model-raises-nothing", [SHADOW_ICH], ROUTINE, ["clinical", "ai-shadow-only"]),
    ("active-beside-shadow", [SYNTH_PTX, ICH], STAT, ["clinical", "ai-finding"]),
    (
        "shadow-beside-active-negative",
        [finding("fracture", flagged=False), SHADOW_ICH],
        ROUTINE,
        ["clinical", "ai-negative"],
    ),
]


@pytest.mark.parametrize(("findings", "level", "codes"), [pytest.param(*row[1:], id=row[0]) for row in SHADOW_GOLDEN])
def test_shadow_findings_golden_table(findings, level, codes):
    priority = compute_priority(ROUTINE, findings, "done", T0, T0, SETTINGS)
    assert priority.level is level
    assert [r.code for r in priority.reasons] == codes
    assert not any("pneumothorax" in r.text or "0.95" in r.text for r in priority.reasons if level is ROUTINE)


def test_waiting_reason_says_minutes_of_target():
    priority = compute_priority(STAT, [], "pending", T0, T0 + timedelta(minutes=75), SETTINGS)
    assert priority.reasons[-1].text == "waiting 75 min, 15 min past the 60 min stat target [default policy]"
    promoted = compute_priority(URGENT, [], "pending", T0, T0 + timedelta(minutes=190), SETTINGS)
    assert promoted.reasons[-1].text.startswith("waiting 190 min of 240 min urgent target")
    assert base_level(promoted) is URGENT
    waited = compute_priority(ROUTINE, [], "done", T0, T0 + timedelta(minutes=130), SETTINGS)
    assert waited.level is ROUTINE
    assert waited.reasons[-1].text == (
        "waiting 130 min, 120 min or more: ordered with the 120 min head start of stat studies so newer ones stop"
        " overtaking it"
    )


def test_stored_findings_of_the_previous_release_are_read_as_records():
    # The JSON a previous release stored (no overlay_file, an unknown key): validated once, then typed.
    stored = {"label": "intracranial_haemorrhage", "probability": 0.8, "flagged": True, "model": "ct-head-ich",
              "model_version": "1.2.0", "synthetic": False, "details": {}, "legacy": 1}  # fmt: skip
    priority = compute_priority(ROUTINE, [Finding.model_validate(stored)], "done", T0, T0, SETTINGS)
    assert priority.level is STAT
    # A release before model states stored no `shadow`: a real model's findings read as active, as they were
    # then; a synthetic-data model's as shadow (that release did not let it raise priority by default either).
    assert Finding.model_validate(stored).shadow is False
    old_synthetic = {**stored, "model": "xr-chest-pneumothorax", "label": "pneumothorax", "synthetic": True}
    assert Finding.model_validate(old_synthetic).shadow is True
    assert compute_priority(ROUTINE, [Finding.model_validate(old_synthetic)], "done", T0, T0, SETTINGS).level is ROUTINE


# The order: score = minutes waited + head start (stat 120, urgent 0, routine 0; stat's from 120 min of waiting).
# id, clinical, findings, minutes waited -> expected level, expected score
SCORE_GOLDEN = [
    ("stat-fresh", STAT, [], 1, STAT, 121.0),
    ("ai-raised-stat", ROUTINE, [ICH], 5, STAT, 125.0),
    ("urgent-fresh-no-head-start", URGENT, [], 10, URGENT, 10.0),
    ("routine-waiting", ROUTINE, [], 90, ROUTINE, 90.0),
    ("routine-just-before-long-wait", ROUTINE, [], 119, ROUTINE, 119.0),
    ("routine-long-wait", ROUTINE, [], 120, ROUTINE, 240.0),
    ("urgent-long-wait-before-promotion", URGENT, [], 170, URGENT, 290.0),
    ("urgent-promoted-near-target", URGENT, [], 180, STAT, 300.0),
    ("stat-overdue", STAT, [], 75, STAT, 195.0),
]


@pytest.mark.parametrize(
    ("clinical", "findings", "waited_min", "level", "score"),
    [pytest.param(*row[1:], id=row[0]) for row in SCORE_GOLDEN],
)
def test_score_golden_table(clinical, findings, waited_min, level, score):
    priority = compute_priority(clinical, findings, "done", T0, T0 + timedelta(minutes=waited_min), SETTINGS)
    assert priority.level is level
    assert priority.score == score


def test_stat_goes_first_until_others_have_waited_the_long_wait():
    now = T0 + timedelta(hours=6)

    def score(level, waited_min):
        return compute_priority(level, [], "done", now - timedelta(minutes=waited_min), now, SETTINGS).score

    # A fresh stat study goes ahead of every study that has waited less than LONG_WAIT_MIN ...
    assert score(STAT, 0) > score(URGENT, 119) > score(ROUTINE, 100)
    # ... urgent and routine studies are read in arrival order until waiting promotes them ...
    assert score(ROUTINE, 60) > score(URGENT, 59)
    # ... and a study that has waited LONG_WAIT_MIN joins the stat studies in arrival order: newer stat studies
    # stop overtaking it, so no study is starved in a backlog.
    assert score(ROUTINE, 125) > score(STAT, 124) > score(ROUTINE, 121)


def test_head_starts_never_fall_as_the_level_rises():
    # A promotion may never move a study down the list (the simulator and the worklist query rely on it).
    ranked = sorted(PriorityLevel, key=lambda level: level.rank)
    assert [HEAD_START_MIN[level] for level in ranked] == sorted(HEAD_START_MIN[level] for level in ranked)
    assert LONG_WAIT_MIN > 0


def test_quick_reads_start_ahead_of_longer_reads_below_stat_only():
    now = T0 + timedelta(hours=6)

    def priority(level, waited_min, modality, settings=SETTINGS):
        return compute_priority(level, [], "done", now - timedelta(minutes=waited_min), now, settings,
                                modality=modality)  # fmt: skip

    quick = SETTINGS.quick_read_head_start_min
    assert quick == 15 and SETTINGS.quick_read_modalities == ["CR", "DX"]
    # A radiograph that arrived up to the head start after a CT is read before it, whatever their levels below stat.
    assert priority(ROUTINE, 5, "CR").score == 5 + quick
    assert priority(ROUTINE, 5, "CR").score > priority(URGENT, 19, "CT").score
    assert priority(ROUTINE, 5, "DX").score < priority(URGENT, 21, "CT").score
    reason = priority(ROUTINE, 5, "DX").reasons[-1]
    assert reason.code == "quick-read" and "15 min ahead" in reason.text and reason.text.endswith("[default policy]")
    # Every modality of the study must be a quick read (a CT with a scout radiograph is not).
    assert priority(ROUTINE, 5, "CR\\CT").score == 5
    assert priority(ROUTINE, 5, "cr\\DX").score == 5 + quick
    # Stat studies and long waits keep the stat head start, with no quick-read reason.
    for p, score in ((priority(STAT, 5, "CR"), 125.0), (priority(ROUTINE, 130, "CR"), 250.0)):
        assert p.score == score
        assert all(r.code != "quick-read" for r in p.reasons)
    # Off at 0; never at or above the stat head start (a promotion to stat must not move a study down).
    off = SETTINGS.model_copy(update={"quick_read_head_start_min": 0.0})
    assert priority(ROUTINE, 5, "CR", off).score == 5
    with pytest.raises(ValueError, match="quick_read_head_start_min"):
        validate_settings(SETTINGS.model_copy(update={"quick_read_head_start_min": HEAD_START_MIN[STAT]}))


def test_same_score_falls_to_the_one_received_first():
    a = compute_priority(ROUTINE, [], "pending", T0, T0, SETTINGS)
    b = compute_priority(ROUTINE, [], "pending", T0 + timedelta(seconds=1), T0 + timedelta(seconds=1), SETTINGS)
    assert a.score == b.score
    assert sort_key(a, T0) < sort_key(b, T0 + timedelta(seconds=1))


def test_priority_to_dict_is_json_ready():
    data = priority_to_dict(compute_priority(ROUTINE, [ICH], "done", T0, T0, SETTINGS))
    assert data["level"] == "stat"
    assert data["reasons"][1]["code"] == "ai-finding"
    assert data["reasons"][1]["level"] == "stat"


@pytest.mark.parametrize("bad", [datetime(2026, 3, 1, 8, 0), "2026-03-01"])
def test_naive_time_is_refused(bad):
    with pytest.raises(ValueError, match="timezone-aware"):
        compute_priority(ROUTINE, [], "pending", T0, bad, SETTINGS)


def test_malformed_finding_is_refused_where_it_is_read():
    # The policy takes records only; a stored finding lacking its fields fails when it is read back, by name.
    with pytest.raises(ValueError, match="probability"):
        Finding.model_validate({"label": "x"})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (PrioritySettings(finding_levels={"ich": "critical-ish"}), "finding_levels\\['ich'\\].*'critical-ish'"),
        (PrioritySettings(turnaround_min={"soon": 10}), "'soon'"),
        (PrioritySettings(turnaround_min={"stat": 0}), "must be > 0"),
        (PrioritySettings(promote_at_fraction=1.5), "promote_at_fraction"),
    ],
)
def test_invalid_policy_is_refused_quoting_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        validate_settings(settings)
