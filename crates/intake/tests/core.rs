//! Intake's decisions, pure: given a core's state, when a submission is planned, then the
//! writes the shell must store and the receipt it must answer.

use domain::{GridCode, Policy, Timestamp};
use expect_test::{Expect, expect};
use intake::core::{Locate, Located, receipt_in_history};
use intake::decode::Place;
use intake::{Core, CoreConfig, Limits, Routing, decode_submission, incident_id_for};
use serde_json::json;

/// Every point is in one grid of a Sanming street that has routes.
struct OneGrid;

impl Locate for OneGrid {
    fn locate(&self, place: &Place) -> Located {
        match place {
            Place::Point { lon, lat } => Located::Grid {
                grid: "350402001001001".parse::<GridCode>().expect("grid code"),
                point: Some((*lon, *lat)),
            },
            Place::Building(id) => Located::UnknownBuilding(format!("no building {id}")),
        }
    }
}

fn submission(id: &str, lon: f64, reporter: u8) -> Vec<u8> {
    json!({
        "submission_id": id,
        "kind": "complaint",
        "category": "0101",
        "location": {"point": {"lon": lon, "lat": 26.26}},
        "description": "垃圾桶满溢 overflowing bin",
        "media": [],
        "channel": "hotline",
        "reporter_id": format!("7d3f1c2e-0000-4000-8000-{reporter:012}"),
        // Before the plans' `now` (2026-11-18T11:06:40Z).
        "occurred_at": "2026-11-18T08:30:00+08:00"
    })
    .to_string()
    .into_bytes()
}

/// In a `check`'s list: the plan before was not stored (its append failed, and so did the
/// re-read that would have corrected memory); the shell forgets its receipt, as it does then.
fn writes_failed() -> Vec<u8> {
    Vec::new()
}

/// Plans each submission in turn on one core (at `now`, one minute apart) and renders, per
/// submission: the receipt, the INTAKE record if any, and the incident write's event types.
fn check(given: &[Vec<u8>], expect: Expect) {
    let policy = Policy::embedded("sanming").expect("sanming policy");
    let mut core = Core::new(CoreConfig::default());
    let mut out = String::new();
    let start = Timestamp(1_795_000_000_000);
    let mut last_planned = String::new();
    for (index, payload) in given.iter().enumerate() {
        if payload.is_empty() {
            core.forget_receipt(&last_planned);
            out.push_str("  (not stored)\n");
            continue;
        }
        let now = start.plus_minutes(u32::try_from(index).expect("few"));
        let valid = decode_submission(payload, None, &Limits::default(), &policy.taxonomy)
            .expect("a valid submission");
        let submission_id = valid.submission_id.clone();
        last_planned = submission_id.clone();
        let plan = core.plan(valid, payload, now, Routing::AtFiling, &OneGrid, &policy);
        let receipt = serde_json::to_value(&plan.receipt).expect("JSON");
        out.push_str(&format!(
            "{submission_id}: {} {}\n",
            receipt["status"], receipt["incident_id"]
        ));
        match &plan.record {
            Some((aggregate, event)) => {
                let kind = serde_json::to_value(event.receipt()).expect("JSON");
                out.push_str(&format!("  INTAKE {aggregate}: {}\n", kind["status"]));
            }
            None => out.push_str("  INTAKE: nothing\n"),
        }
        if let Some(write) = &plan.incident {
            let types: Vec<&str> = write
                .events
                .iter()
                .map(domain::encoding::event_type)
                .collect();
            out.push_str(&format!(
                "  INCIDENTS {}: {}\n",
                write.incident,
                types.join(", ")
            ));
            // The filing commit alone gives back the receipt the reporter got.
            if write.incident == incident_id_for(&submission_id) {
                let rebuilt = receipt_in_history(&submission_id, write.incident, &write.events);
                assert_eq!(rebuilt.as_ref(), Some(&plan.receipt), "{submission_id}");
            }
        }
    }
    expect.assert_eq(&out);
}

#[test]
fn a_filing_is_one_commit_that_holds_its_receipt() {
    check(
        &[submission("file-0001", 117.63, 1)],
        expect![[r#"
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.reported, incident.filed, incident.submission_taken, incident.dispatched
        "#]],
    );
}

/// A submission decided long after it arrived (intake was down) is filed undispatched:
/// dispatch routes it on its own clock, so its handler gets whole deadlines. Its receipt
/// names the grid and a deadline counted from the decision, not from the arrival (which
/// would be spent already): decided 18 h after an evening arrival, it is due 5,000,000 ms
/// (working time) after the decision; counted from the arrival it fell due 14.9 h after
/// the arrival, three hours before the decision.
#[test]
fn a_submission_that_waited_is_filed_for_dispatch_to_route() {
    let policy = Policy::embedded("sanming").expect("sanming policy");
    let payload = submission("late-0001", 117.63, 1);
    let valid =
        decode_submission(&payload, None, &Limits::default(), &policy.taxonomy).expect("valid");
    let mut core = Core::new(CoreConfig::default());
    let now = Timestamp(1_795_000_000_000);
    let decided_at = Timestamp(now.0 + 18 * 3_600_000);
    let routing = Routing::ByDispatch { decided_at };
    let plan = core.plan(valid, &payload, now, routing, &OneGrid, &policy);
    let write = plan.incident.expect("a filing");
    let types: Vec<&str> = write
        .events
        .iter()
        .map(domain::encoding::event_type)
        .collect();
    let receipt = serde_json::to_value(&plan.receipt).expect("JSON");
    expect![[r#"
        "filed" 5000000
        incident.reported, incident.filed, incident.submission_taken"#]]
    .assert_eq(&format!(
        "{} {}\n{}",
        receipt["status"],
        receipt["respond_by_ms"]
            .as_i64()
            .map_or(-1, |due| due - decided_at.0),
        types.join(", ")
    ));
}

#[test]
fn a_report_dated_after_its_arrival_is_refused() {
    let mut late = serde_json::from_slice::<serde_json::Value>(&submission("file-0001", 117.63, 1))
        .expect("JSON");
    // 50 minutes after arrival is a fast clock; two hours is not.
    late["occurred_at"] = json!("2026-11-18T11:56:40Z");
    let mut future = late.clone();
    future["submission_id"] = json!("file-0002");
    future["occurred_at"] = json!("2026-11-18T13:07:40Z");
    check(
        &[
            late.to_string().into_bytes(),
            future.to_string().into_bytes(),
        ],
        expect![[r#"
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.reported, incident.filed, incident.submission_taken, incident.dispatched
            file-0002: "rejected" null
              INTAKE file-0002: "rejected"
        "#]],
    );
}

#[test]
fn a_resubmission_returns_the_receipt_and_writes_nothing() {
    check(
        &[
            submission("file-0001", 117.63, 1),
            submission("file-0001", 117.63, 1),
        ],
        expect![[r#"
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.reported, incident.filed, incident.submission_taken, incident.dispatched
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
        "#]],
    );
}

/// A filing whose commit was not stored is decided again as a filing when the submission
/// comes back (redelivered, or resent): never answered "filed" from memory alone, with only
/// an INTAKE record and no incident in the store.
#[test]
fn a_filing_not_stored_is_filed_again() {
    check(
        &[
            submission("file-0001", 117.63, 1),
            writes_failed(),
            submission("file-0001", 117.63, 1),
        ],
        expect![[r#"
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.reported, incident.filed, incident.submission_taken, incident.dispatched
              (not stored)
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.reported, incident.filed, incident.submission_taken, incident.dispatched
        "#]],
    );
}

#[test]
fn a_duplicate_is_merged_and_recorded_on_intake() {
    check(
        &[
            submission("file-0001", 117.63, 1),
            submission("file-0002", 117.63001, 2),
            // The same reporter again: already on the incident, nothing more to write.
            submission("file-0003", 117.63001, 2),
        ],
        expect![[r#"
            file-0001: "filed" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE: nothing
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.reported, incident.filed, incident.submission_taken, incident.dispatched
            file-0002: "merged" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE file-0002: "merged"
              INCIDENTS 70fbdbb8-06e4-8edb-9d25-10326fffd7df: incident.duplicate_merged
            file-0003: "merged" "70fbdbb8-06e4-8edb-9d25-10326fffd7df"
              INTAKE file-0003: "merged"
        "#]],
    );
}

/// Receipts held in memory are evicted oldest first, counting a receipt forgotten (its
/// decision not stored) and remembered again from when it was remembered again: a stale
/// entry of the first time does not evict it early.
#[test]
fn a_receipt_remembered_again_is_evicted_in_its_new_turn() {
    let mut core = Core::new(CoreConfig {
        receipts_held_max: 2,
        ..CoreConfig::default()
    });
    let refused = |id: &str| intake::Receipt::Rejected {
        submission_id: Some(id.to_owned()),
        reason_code: intake::wire::ReasonCode::RateLimited,
        message: "test".to_owned(),
    };
    core.remember("a", refused("a"));
    core.forget_receipt("a");
    core.remember("b", refused("b"));
    core.remember("a", refused("a"));
    core.remember("c", refused("c"));
    let held: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|id| core.receipt(id).is_some())
        .collect();
    assert_eq!(held, ["a", "c"], "b was the oldest receipt held");
    assert!(core.receipts_evicted());
}

/// `write` as the commit stored at `sequence`, its first event at `first_version`.
fn stored(
    incident: domain::IncidentId,
    events: Vec<domain::incident::IncidentEvent>,
    first_version: u64,
    sequence: u64,
) -> eventstore::RecordedCommit<domain::incident::IncidentEvent> {
    let version = first_version + events.len() as u64 - 1;
    eventstore::RecordedCommit {
        aggregate: eventstore::AggregateId::new(incident.0.hyphenated().to_string())
            .expect("aggregate id"),
        command_id: format!("stored-{sequence}"),
        sequence,
        first_version,
        version,
        events: events
            .into_iter()
            .enumerate()
            .map(|(index, event)| eventstore::RecordedEvent {
                event_id: uuid::Uuid::from_u128(u128::from(sequence) * 100 + index as u128),
                version: first_version + index as u64,
                event_type: domain::encoding::event_type(&event).to_owned(),
                event,
            })
            .collect(),
        meta: eventstore::CommitMeta {
            correlation_id: uuid::Uuid::from_u128(1),
            causation_id: uuid::Uuid::from_u128(1),
            actor: "system:intake".to_owned(),
            occurred_at_ms: 1_795_000_000_000,
            traceparent: None,
        },
        previous_hash: [0; 32],
        hash: [sequence as u8; 32],
        stored_at_ms: 1_795_000_000_000,
    }
}

/// A submission merged into an incident whose merge commit was stored but whose receipt was
/// not (a crash between the two): redelivered after the original closed, it is answered with
/// that merge, not filed as a new incident (one submission, one outcome).
#[test]
fn a_merge_stored_before_a_crash_is_answered_again_after_its_original_closed() {
    let policy = Policy::embedded("sanming").expect("sanming policy");
    let now = Timestamp(1_795_000_000_000);
    let plan = |core: &mut Core, payload: &[u8], minutes: u32| {
        let valid =
            decode_submission(payload, None, &Limits::default(), &policy.taxonomy).expect("valid");
        core.plan(
            valid,
            payload,
            now.plus_minutes(minutes),
            Routing::AtFiling,
            &OneGrid,
            &policy,
        )
    };
    // Before the crash: the first report files incident A, the second merges into it; both
    // commits are stored, the second's INTAKE record is not.
    let mut before = Core::new(CoreConfig::default());
    let first = submission("file-0001", 117.63, 1);
    let second = submission("file-0002", 117.63001, 2);
    let filed = plan(&mut before, &first, 0).incident.expect("a filing");
    let merged = plan(&mut before, &second, 1).incident.expect("a merge");
    assert_eq!(merged.incident, filed.incident);
    let original = filed.incident;
    let filing_events = filed.events.len() as u64;
    // After the restart: the log is folded, and the original is cancelled meanwhile.
    let mut after = Core::new(CoreConfig::default());
    after.fold(&stored(original, filed.events, 1, 1));
    after.fold(&stored(original, merged.events, filing_events + 1, 2));
    let cancelled = domain::incident::IncidentEvent::Cancelled {
        by: domain::Actor {
            role: domain::Role::System,
            id: domain::ActorId(uuid::Uuid::from_u128(9)),
        },
    };
    after.fold(&stored(original, vec![cancelled], filing_events + 2, 3));
    assert!(
        after.tracked(&original).is_none(),
        "a cancelled incident leaves memory"
    );
    let again = plan(&mut after, &second, 30);
    let receipt = serde_json::to_value(&again.receipt).expect("JSON");
    assert_eq!(
        (receipt["status"].as_str(), receipt["incident_id"].as_str()),
        (Some("merged"), Some(original.0.to_string().as_str())),
        "{receipt}"
    );
    assert!(again.incident.is_none(), "nothing more on INCIDENTS");
    assert!(
        again.record.is_some(),
        "the merge's receipt is recorded now"
    );
}

/// A report merged into an incident that was filed for dispatch to route (no response
/// deadline yet) is told the deadline the original's receipt promised, not one counted from
/// its own arrival; and a receipt rebuilt from the log after a crash (merge commit stored,
/// INTAKE record not) says the same, not the merge commit's own time.
#[test]
fn a_merge_into_an_incident_not_yet_routed_promises_the_originals_deadline() {
    let policy = Policy::embedded("sanming").expect("sanming policy");
    // 18 h after the other tests' `now`: in working hours, so an hour later is a later
    // deadline.
    let decided_at = Timestamp(1_795_000_000_000 + 18 * 3_600_000);
    let plan = |core: &mut Core, payload: &[u8], now: Timestamp, routing: Routing| {
        let valid =
            decode_submission(payload, None, &Limits::default(), &policy.taxonomy).expect("valid");
        core.plan(valid, payload, now, routing, &OneGrid, &policy)
    };
    let respond_by = |plan: &intake::core::Plan| {
        serde_json::to_value(&plan.receipt).expect("JSON")["respond_by_ms"]
            .as_i64()
            .expect("respond_by_ms")
    };
    let first = submission("file-0001", 117.63, 1);
    let second = submission("file-0002", 117.63001, 2);
    let mut before = Core::new(CoreConfig::default());
    let filed = plan(
        &mut before,
        &first,
        Timestamp(decided_at.0 - 3_600_000),
        Routing::ByDispatch { decided_at },
    );
    let merged = plan(
        &mut before,
        &second,
        decided_at.plus_minutes(60),
        Routing::AtFiling,
    );
    let promised = respond_by(&filed);
    let filing = filed.incident.expect("a filing");
    let merge = merged.incident.clone().expect("a merge");
    assert_eq!(merge.incident, filing.incident, "merged into the first");
    let filing_events = filing.events.len() as u64;
    let mut after = Core::new(CoreConfig::default());
    after.fold(&stored(filing.incident, filing.events, 1, 1));
    after.fold(&stored(filing.incident, merge.events, filing_events + 1, 2));
    let again = plan(
        &mut after,
        &second,
        decided_at.plus_minutes(30),
        Routing::AtFiling,
    );
    expect![[r#"
        filed: due 5000000 ms after the decision
        merged: due 0 ms after the original's promise
        answered again after the crash: due 0 ms after the original's promise"#]]
    .assert_eq(&format!(
        "filed: due {} ms after the decision\nmerged: due {} ms after the original's promise\nanswered again after the crash: due {} ms after the original's promise",
        promised - decided_at.0,
        respond_by(&merged) - promised,
        respond_by(&again) - promised,
    ));
}

/// An incident filed by a version before `incident.submission_taken`, whose INTAKE record
/// was lost in a crash: the submission, redelivered hours later, is answered with the
/// deadline the stored incident holds, not one counted from the redelivery.
#[test]
fn a_filing_without_its_receipt_is_answered_with_the_stored_deadline() {
    let policy = Policy::embedded("sanming").expect("sanming policy");
    let now = Timestamp(1_795_000_000_000 + 18 * 3_600_000);
    let payload = submission("file-0001", 117.63, 1);
    let plan = |core: &mut Core, now: Timestamp| {
        let valid =
            decode_submission(&payload, None, &Limits::default(), &policy.taxonomy).expect("valid");
        core.plan(valid, &payload, now, Routing::AtFiling, &OneGrid, &policy)
    };
    let respond_by = |plan: &intake::core::Plan| {
        serde_json::to_value(&plan.receipt).expect("JSON")["respond_by_ms"]
            .as_i64()
            .expect("respond_by_ms")
    };
    let first = plan(&mut Core::new(CoreConfig::default()), now);
    let filing = first.incident.clone().expect("a filing");
    // The older version's filing commit: the same events without the receipt's.
    let older: Vec<_> = filing
        .events
        .into_iter()
        .filter(|event| domain::encoding::event_type(event) != "incident.submission_taken")
        .collect();
    let mut after = Core::new(CoreConfig::default());
    after.fold(&stored(filing.incident, older, 1, 1));
    let again = plan(&mut after, now.plus_minutes(90));
    let types: Vec<&str> = again
        .incident
        .iter()
        .flat_map(|write| write.events.iter().map(domain::encoding::event_type))
        .collect();
    expect![[r#"
        filed, due 0 ms after the first answer's deadline; INCIDENTS: []; INTAKE record: true"#]]
    .assert_eq(&format!(
        "{}, due {} ms after the first answer's deadline; INCIDENTS: {types:?}; INTAKE record: {}",
        serde_json::to_value(&again.receipt).expect("JSON")["status"]
            .as_str()
            .unwrap_or("?"),
        respond_by(&again) - respond_by(&first),
        again.record.is_some(),
    ));
}
