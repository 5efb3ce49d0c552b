"""`triage simulate`: golden waits on a tiny night, the JSON contract, the CSV inputs, and that the simulator ranks
studies exactly as the worklist database does."""

from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from triage.cli import app
from triage.config import PrioritySettings, Settings
from triage.domain import AIStatus, Finding, InstanceMeta, PriorityLevel
from triage.training.simulate import (
    CLASSES,
    POLICIES,
    Clock,
    InvalidScenarioError,
    PolicyQueue,
    SimStudy,
    SiteRules,
    StudyState,
    draw_studies,
    load_scenario,
    make_queue,
    order_studies,
    parse_scenario,
    read_arrivals_csv,
    read_probabilities_csv,
    resolve_models,
    run_simulation,
    simulate_night,
)
from triage.worklist.db import migrate
from triage.worklist.priority import queue_order
from triage.worklist.repository import Worklist
from triage.worklist.sites import parse_site

WEIGHTS = Settings().weights_dir
CT = "1.2.840.10008.5.1.4.1.1.2"
US_PER_MIN = 60_000_000

# One radiologist, one site, fixed read times: every wait below can be worked out by hand.
TINY = {
    "name": "tiny",
    "description": "five studies, one radiologist",
    "generated": False,
    "start": "2026-03-02T18:00:00+00:00",
    "study_types": [
        {"name": "head-ct", "share": 1, "critical_prevalence": 0.1, "read": {"median_min": 10},
         "model": "ct-head-ich", "analysis_min": 1},
        {"name": "xr", "share": 1, "critical_prevalence": 0.01, "read": {"median_min": 10}},
        {"name": "mr", "share": 0, "critical_prevalence": 0.01, "read": {"median_min": 125}},
    ],
    "clinical_priority": {"critical": {"stat": 1}, "other": {"routine": 1}},
    "models": [{"name": "ct-head-ich", "sensitivity": 0.9, "specificity": 0.9}],
    "sites": [{"name": "TINY", "share": 1, "turnaround_min": {"stat": 30, "urgent": 120, "routine": 720}}],
    "radiologists": [{"name": "dr-one", "start_h": 0, "end_h": 10}],
}  # fmt: skip

# A: routine X-ray at 0; B: routine X-ray at 1; C: routine head CT at 2 with a bleed the model flags (known at 3);
# D: urgent X-ray at 3; E: stat X-ray at 4. Each read takes 10 min.
ARRIVALS = """study_id,time,site,modality,clinical_priority,critical,read_min
A,0,TINY,xr,ROUTINE,no,10
B,1,TINY,xr,routine,no,10
C,2,TINY,head-ct,routine,yes,10
D,3,TINY,xr,HIGH,no,10
E,2026-03-02T18:04:00+00:00,TINY,xr,STAT,no,10
"""
PROBABILITIES = "study_id,probability\nC,0.93\n"

# Hand-worked: FIFO reads in arrival order at 0, 10, 20, 30, 40. The service reads A at 0; at 10 the flagged
# head CT (stat: 8 min + 120 head start) beats the stat X-ray (6 + 120) and the rest (waits 9 and 7); at 20 the stat
# X-ray; then routine B (29 min) before urgent D (27 min): urgent and routine go in arrival order. Strict AI levels
# read urgent D before routine B.
GOLDEN_WAITS = {
    "fifo": {"A": 0, "B": 9, "C": 18, "D": 27, "E": 36},
    "ai-levels": {"A": 0, "C": 8, "E": 16, "D": 27, "B": 39},
    "service": {"A": 0, "C": 8, "E": 16, "B": 29, "D": 37},
    "next-study": {"A": 0, "C": 8, "E": 16, "B": 29, "D": 37},
}


@pytest.fixture
def tiny(tmp_path):
    arrivals = tmp_path / "arrivals.csv"
    arrivals.write_text(ARRIVALS)
    probabilities = tmp_path / "probabilities.csv"
    probabilities.write_text(PROBABILITIES)
    scenario_path = tmp_path / "tiny.yaml"
    scenario_path.write_text(json.dumps(TINY))  # JSON is YAML
    return scenario_path, arrivals, probabilities


def simulate_tiny(tiny, seeds=1, policies=POLICIES):
    scenario_path, arrivals, probabilities = tiny
    scenario, source = load_scenario(scenario_path)
    return run_simulation(
        scenario, source, PrioritySettings(), WEIGHTS, seeds=seeds, policies=policies,
        arrivals_csv=arrivals, probabilities_csv=probabilities,
    )  # fmt: skip


@pytest.mark.parametrize("policy", POLICIES)
def test_golden_waits_on_a_tiny_night(tiny, policy):
    scenario_path, arrivals, probabilities = tiny
    result = simulate_tiny(tiny, policies=[policy])
    scenario, _ = load_scenario(scenario_path)
    rules = SiteRules.of(scenario, PrioritySettings())
    studies = draw_studies(
        scenario, resolve_models(scenario, WEIGHTS), 0, read_arrivals_csv(arrivals, scenario),
        read_probabilities_csv(probabilities),
    )  # fmt: skip
    night = simulate_night(studies, scenario, policy, rules)
    waits = {s.uid: night.wait_min(s) for s in studies}
    assert waits == pytest.approx(GOLDEN_WAITS[policy])
    order = sorted(waits, key=lambda uid: night.read_start_us[uid])
    assert order == list(GOLDEN_WAITS[policy])
    # The figures per class come from the same waits: C is the critical positive, E stat, D urgent, A and B routine.
    figures = result.summary()["policies"][policy]
    expected = GOLDEN_WAITS[policy]
    assert figures["critical"]["median_min"] == pytest.approx(expected["C"])
    assert figures["stat"]["max_min"] == pytest.approx(expected["E"])
    assert figures["urgent"]["median_min"] == pytest.approx(expected["D"])
    assert figures["routine"]["median_min"] == pytest.approx((expected["A"] + expected["B"]) / 2)
    assert figures["routine"]["max_min"] == pytest.approx(max(expected["A"], expected["B"]))


def test_contract_breaches_per_site(tiny):
    # Targets: stat 30 (also for the critical head CT), urgent 120, routine 720. Under FIFO only the stat X-ray (36
    # min) breaches: 1 of 5 studies; the service reads every study within its target.
    breaches = simulate_tiny(tiny).summary()["breaches"]
    assert breaches["fifo"]["TINY"]["share"] == pytest.approx(0.2)
    assert breaches["service"]["TINY"]["share"] == 0


def test_a_study_waiting_past_the_long_wait_goes_before_a_new_stat_study(tmp_path):
    # The radiologist reads a 125-min MR from 0. Routine R1 (at 1) has waited 124 min when they are free at 125;
    # stat S1 arrived at 124. Strict levels read S1 first (R1 waits 129 min); the service reads R1 (124 min, past
    # the 120 min long wait) and then S1 (6 min), so a backlog cannot starve R1.
    arrivals = tmp_path / "arrivals.csv"
    arrivals.write_text(
        "study_id,time,site,modality,clinical_priority,critical,read_min\n"
        "R0,0,TINY,mr,routine,no,125\nR1,1,TINY,xr,routine,no,5\nS1,124,TINY,xr,stat,no,5\n"
    )
    scenario = parse_scenario(TINY)
    result = run_simulation(scenario, "tiny", PrioritySettings(), WEIGHTS, seeds=1, arrivals_csv=arrivals)
    policies = result.summary()["policies"]
    assert policies["ai-levels"]["stat"]["max_min"] == pytest.approx(1)
    assert policies["ai-levels"]["routine"]["max_min"] == pytest.approx(129)
    assert policies["service"]["routine"]["max_min"] == pytest.approx(124)
    assert policies["service"]["stat"]["max_min"] == pytest.approx(6)


def test_next_study_reads_only_credentialed_sites(tmp_path):
    scenario = parse_scenario(
        {
            **TINY,
            "sites": [{"name": "NORTH", "share": 1}, {"name": "SOUTH", "share": 1}],
            "radiologists": [
                {"name": "dr-north", "start_h": 0, "end_h": 10, "sites": ["NORTH"]},
                {"name": "dr-any", "start_h": 0, "end_h": 10},
            ],
        }
    )
    arrivals = tmp_path / "arrivals.csv"
    # Two SOUTH studies at once: dr-north may not read them, so the second waits for dr-any under next-study.
    arrivals.write_text(
        "study_id,time,site,modality,clinical_priority,critical,read_min\n"
        "S1,0,SOUTH,xr,routine,no,10\nS2,0,SOUTH,xr,routine,no,10\n"
    )
    result = run_simulation(scenario, "two sites", PrioritySettings(), WEIGHTS, seeds=1, arrivals_csv=arrivals)
    policies = result.summary()["policies"]
    assert policies["service"]["routine"]["max_min"] == 0
    assert policies["next-study"]["routine"]["max_min"] == pytest.approx(10)


def test_json_contract_on_the_default_scenario():
    out = CliRunner().invoke(app, ["simulate", "--scenario", "default", "--json", "--seeds", "2"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert {"fifo", "service"} <= set(data["policies"])
    for policy in data["policies"].values():
        for klass in ("critical", "urgent", "routine"):
            figures = policy[klass]
            for key in ("median_min", "p90_min", "max_min"):
                assert isinstance(figures[key], float)
            assert figures["median_min"] <= figures["p90_min"] <= figures["max_min"]
    assert data["scenario"]["seeds"] == 2
    assert data["scenario"]["radiologists"] == 3 and data["scenario"]["sites"] == 12


def test_cli_csv_inputs_report_and_plot(tiny, tmp_path):
    scenario_path, arrivals, probabilities = tiny
    out_dir = tmp_path / "report"
    args = ["simulate", "--scenario", str(scenario_path), "--arrivals", str(arrivals), "--probabilities",
            str(probabilities), "--seeds", "2", "--out", str(out_dir)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "service" in result.stdout and "critical" in result.stdout
    report = (out_dir / "report.md").read_text()
    assert "| service | critical |" in report
    assert (out_dir / "waits-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out_dir / "summary.json").read_text())["policies"]["fifo"]["critical"]["median_min"] == 18


def test_probabilities_decide_the_flag_against_the_card_threshold(tiny, tmp_path):
    # ct-head-ich flags at p >= 0.5 (its card): at 0.49 the head CT is not raised; the service reads A at 0, the
    # stat X-ray at 10, then B at 20 and the head CT at 30 (28 min after it arrived).
    scenario_path, arrivals, probabilities = tiny
    probabilities.write_text("study_id,probability\nC,0.49\n")
    scenario, source = load_scenario(scenario_path)
    result = run_simulation(scenario, source, PrioritySettings(), WEIGHTS, seeds=1, policies=["service"],
                            arrivals_csv=arrivals, probabilities_csv=probabilities)  # fmt: skip
    assert result.summary()["policies"]["service"]["critical"]["median_min"] == pytest.approx(28)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("A,0,NOWHERE,xr,routine,no,10", "site 'NOWHERE' is not in the scenario"),
        ("A,0,TINY,ultrasound,routine,no,10", "modality 'ultrasound' is not a study type"),
        ("A,0,TINY,xr,whenever,no,10", "whenever"),
        ("A,0,TINY,xr,routine,maybe,10", "must be yes or no"),
        ("A,yesterday,TINY,xr,routine,no,10", "neither minutes"),
        ("A,2026-03-02T18:04:00,TINY,xr,routine,no,10", "UTC offset"),
        ("A,0,TINY,xr,routine,no,-1", "read_min must be above 0"),
    ],
)
def test_bad_arrivals_rows_are_refused_quoting_the_value(tmp_path, row, message):
    path = tmp_path / "arrivals.csv"
    path.write_text("study_id,time,site,modality,clinical_priority,critical,read_min\n" + row + "\n")
    with pytest.raises(InvalidScenarioError, match=message):
        read_arrivals_csv(path, parse_scenario(TINY))


def test_a_missing_probability_and_an_unknown_scenario_are_refused(tiny, tmp_path):
    scenario_path, arrivals, probabilities = tiny
    probabilities.write_text("study_id,probability\nA,0.2\n")
    with pytest.raises(InvalidScenarioError, match="no row for study 'C'"):
        simulate_tiny(tiny)
    with pytest.raises(InvalidScenarioError, match="default"):
        load_scenario("no-such-scenario")
    with pytest.raises(InvalidScenarioError, match="models listed"):
        parse_scenario({**TINY, "models": []})


def test_shadow_model_raises_nothing(tiny):
    scenario_path, arrivals, probabilities = tiny
    shadow = parse_scenario({**TINY, "models": [{"name": "ct-head-ich", "state": "shadow", "sensitivity": 0.9,
                                                 "specificity": 0.9}]})  # fmt: skip
    result = run_simulation(shadow, "shadow", PrioritySettings(), WEIGHTS, seeds=1, policies=["fifo", "service"],
                            arrivals_csv=arrivals, probabilities_csv=probabilities)  # fmt: skip
    # Flagged, but in shadow: the head CT keeps its routine place (read at 30, after A, the stat X-ray and B).
    assert result.summary()["policies"]["service"]["critical"]["median_min"] == pytest.approx(28)


def test_default_scenario_is_documented_as_generated_with_its_parameters():
    scenario, source = load_scenario("default")
    assert scenario.generated and "Generated" in scenario.description
    assert len(scenario.radiologists) == 3 and len(scenario.sites) == 12
    assert max(scenario.arrivals_per_hour) == 120
    shares = {t.name: t.share / sum(x.share for x in scenario.study_types) for t in scenario.study_types}
    assert shares["head-ct"] == pytest.approx(0.40) and shares["chest-xr"] == pytest.approx(0.35)
    prevalence = sum(t.critical_prevalence * shares[t.name] for t in scenario.study_types)
    assert prevalence == pytest.approx(0.03, abs=0.002)
    assert source == "default (shipped: triage/training/scenarios/default.yaml)"


# ------------------------------------------------------------------------------------------ parity with the worklist


def _finding(flagged: bool, shadow: bool = False) -> Finding:
    return Finding(label="intracranial_haemorrhage", probability=0.9 if flagged else 0.1, flagged=flagged,
                   model="ct-head-ich", model_version="1.0.0", synthetic=False, shadow=shadow)  # fmt: skip


def _random_worklist(rng: random.Random, n: int, sites: list[str]):
    """(study, AI status, findings) for `n` studies of `sites` in every state the worklist shows."""
    out = []
    for i in range(n):
        arrival_us = rng.randrange(0, 300 * US_PER_MIN)
        if out and rng.random() < 0.1:
            arrival_us = out[-1][0].arrival_us  # the same arrival: ties fall to the Study Instance UID
        clinical = rng.choice([PriorityLevel.ROUTINE, PriorityLevel.ROUTINE, PriorityLevel.URGENT, PriorityLevel.STAT])
        kind, modality = rng.choice([("head-ct", "CT"), ("head-ct", "CT"), ("chest-xr", "DX"), ("chest-xr", "CR")])
        study = SimStudy(f"1.2.826.0.7.{i}", rng.choice(sites), kind, clinical, False, arrival_us, US_PER_MIN,
                         modality=modality)  # fmt: skip
        status = rng.choice([AIStatus.PENDING, AIStatus.DONE, AIStatus.DONE, AIStatus.FAILED, AIStatus.NOT_APPLICABLE])
        findings: tuple[Finding, ...] = ()
        if status is AIStatus.DONE:
            findings = (rng.choice([_finding(True), _finding(False), _finding(True, shadow=True)]),)
        out.append((study, status, findings))
    return out


def _record(wl: Worklist, clock: Clock, study: SimStudy, status: AIStatus, findings, institution: str) -> None:
    received = clock.at(study.arrival_us)
    wl.record_instance(
        InstanceMeta(
            study_uid=study.uid, series_uid=f"{study.uid}.1", sop_instance_uid=f"{study.uid}.1.1", sop_class_uid=CT,
            modality=study.modality, key=f"{study.uid}/1/1.dcm", requested_priority=study.clinical.value.upper(),
            calling_ae="MODALITY1", institution=institution,
        ),
        received,
    )  # fmt: skip
    if status is AIStatus.PENDING:
        return
    generation = wl.begin_analysis(study.uid, received)
    reason = {AIStatus.DONE: "", AIStatus.FAILED: "worker died"}.get(status, "no model applies")
    wl.finish_analysis(study.uid, generation, [f.model_dump() for f in findings], [], status, reason, received)


def _read_times(states: list[StudyState], rules: SiteRules, clock: Clock) -> list[int]:
    """Ordinary read times and the microsecond before and at which some study is promoted or passes the long wait."""
    times = [0, 37 * US_PER_MIN + 3, 200 * US_PER_MIN, 600 * US_PER_MIN, 2000 * US_PER_MIN]
    for state in states[:8]:
        study = state.study
        times += [study.arrival_us + 120 * US_PER_MIN - 1, study.arrival_us + 120 * US_PER_MIN]
        for base in (PriorityLevel.ROUTINE, PriorityLevel.URGENT):
            promote_at = queue_order(base, clock.at(study.arrival_us), rules.settings[study.site]).promote_at
            if promote_at is not None:
                at = (promote_at - clock.start) // timedelta(microseconds=1)
                times += [at - 1, at]
    return times


@pytest.mark.parametrize("with_sites", [False, True], ids=["default-policy", "site-policies"])
def test_simulator_and_worklist_rank_the_same_studies_identically(tmp_path, with_sites):
    settings = PrioritySettings(
        finding_levels={"intracranial_haemorrhage": "stat"},
        turnaround_min={"stat": 60, "urgent": 240, "routine": 1440},
        promote_at_fraction=0.75,
    )
    url = f"sqlite:///{tmp_path / 'worklist.db'}"
    migrate(url)
    wl = Worklist.open(url, settings)
    wl.sites.refresh_s = 0
    site_rules = {
        "NORTH": {"turnaround_min": {"stat": 30, "urgent": 120, "routine": 720}},
        "SOUTH": {"turnaround_min": {"urgent": 100}, "finding_levels": {"intracranial_haemorrhage": "urgent"},
                  "promote_at_fraction": 0.5},
    }  # fmt: skip
    scenario = parse_scenario(
        {
            **TINY,
            "sites": [
                {"name": name, "share": 1, **(rules if with_sites else {})} for name, rules in site_rules.items()
            ],
        }
    )
    if with_sites:
        for name, rules in site_rules.items():
            wl.save_site(
                parse_site({"name": name, "institution_names": [name.title()], **rules}), "admin", scenario.start
            )
    rules = SiteRules.of(scenario, settings)
    clock = Clock(scenario.start)
    rng = random.Random(7)
    listed = _random_worklist(rng, 60, list(site_rules))
    for study, status, findings in listed:
        _record(wl, clock, study, status, findings, study.site.title())
    states = [StudyState(study, status, findings) for study, status, findings in listed]
    try:
        for now_us in _read_times(states, rules, clock):
            ours = order_studies(states, now_us, "service", rules, clock)
            theirs = [item.study_uid for item in wl.list_worklist(clock.at(now_us))]
            assert ours == theirs, f"orders differ at {now_us / US_PER_MIN:.6f} min"
            # The simulator's fast path (one study ranked per group) picks the same studies in the same order.
            queue = make_queue("service", rules, clock)
            for state in states:
                queue.add(state, now_us)
            picked = []
            while (state := queue.pick(now_us, None)) is not None:
                picked.append(state.study.uid)
                queue.remove(state.study.uid)
            assert picked == ours
    finally:
        wl.close()


@pytest.mark.parametrize("policy", ["fifo", "ai-levels", "service"])
def test_fast_pick_is_the_first_of_the_full_order_as_states_change(policy):
    # Studies arrive, get their AI results and are read at random instants: each pick is the full order's first.
    scenario = parse_scenario({**TINY, "sites": [{"name": "NORTH", "share": 1}, {"name": "SOUTH", "share": 1,
                              "turnaround_min": {"stat": 20, "urgent": 60}}]})  # fmt: skip
    rules, clock = SiteRules.of(scenario, PrioritySettings()), Clock(scenario.start)
    rng = random.Random(11)
    queue = make_queue(policy, rules, clock)
    queued: dict[str, StudyState] = {}
    listed = sorted(_random_worklist(rng, 80, ["NORTH", "SOUTH"]), key=lambda s: s[0].arrival_us)
    now_us = 0
    for study, status, findings in listed:
        now_us = study.arrival_us
        state = StudyState(study, AIStatus.PENDING)
        queue.add(state, now_us)
        queued[study.uid] = state
        if status is AIStatus.DONE and rng.random() < 0.7:
            done = StudyState(study, AIStatus.DONE, findings)
            queue.update(done, now_us)
            queued[study.uid] = done
        if rng.random() < 0.4:
            picked = queue.pick(now_us, None)
            assert picked is not None
            assert picked.study.uid == order_studies(queued.values(), now_us, policy, rules, clock)[0]
            queue.remove(picked.study.uid)
            del queued[picked.study.uid]
    assert isinstance(queue, PolicyQueue) == (policy != "fifo")


def test_every_class_is_reported():
    assert set(CLASSES) == {"critical", "stat", "urgent", "routine"}
