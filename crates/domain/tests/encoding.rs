//! Golden bytes: every event type's stored v1 encoding, committed under `tests/golden/`, must
//! decode forever to the same event.
//!
//! The files are written once with `WANGGE_WRITE_GOLDEN=1 cargo test -p domain --test encoding`
//! (only missing files are written; existing golden bytes are never overwritten). The normal
//! run only reads and compares.

use std::collections::BTreeSet;
use std::path::PathBuf;

use domain::encoding::{DecodeError, EVENT_TYPES, decode_event, encode_event};
use domain::incident::{
    Channel, DeadlineKind, Handler, IncidentEvent, Level, Position, RejectReason, ReturnReason,
    RouteSource, Satisfaction, SubmissionKind, Summoned, WhistleCause,
};
use domain::routing::WhistleKind;
use domain::{Actor, ActorId, Clock, IncidentId, Role, Timestamp};
use expect_test::expect;

fn actor(role: Role) -> Actor {
    Actor {
        role,
        id: ActorId(uuid::Uuid::from_u128(
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        )),
    }
}
fn shizheng() -> domain::DepartmentId {
    "shizheng".parse().expect("department id")
}
fn t(n: i64) -> Timestamp {
    Timestamp(1_773_108_000_000 + n * 60_000)
}

/// One sample of every event type, with every optional field filled where it has one.
fn samples() -> Vec<IncidentEvent> {
    use IncidentEvent as E;
    let dept = Role::Department(shizheng());
    let summoned = vec![Summoned {
        department: shizheng(),
        report_by: t(30),
    }];
    vec![
        E::Reported {
            incident: IncidentId(uuid::Uuid::from_u128(0xCA5E)),
            by: actor(Role::Resident),
            description: "路面有个大坑".to_owned(),
            position: Some(Position {
                lat_e7: 262_650_000,
                lon_e7: 1_176_390_000,
            }),
            category_hint: Some("1201".parse().expect("category")),
        },
        E::Filed {
            by: actor(Role::System),
            grid: "350404002001001".parse().expect("grid"),
            category: "1201".parse().expect("category"),
            emergency: false,
        },
        E::ReportRejected {
            by: actor(Role::Street),
            reason: RejectReason::OutsideJurisdiction,
            note: "不在本市".to_owned(),
        },
        E::Dispatched {
            by: actor(Role::System),
            handler: Handler::Department(shizheng()),
            source: RouteSource::StreetOverride,
            clock: Clock::Working,
            response_due: t(60),
            resolution_due: t(1260),
        },
        E::Acknowledged {
            by: actor(dept),
            late: true,
        },
        E::Resolved {
            by: actor(dept),
            late: false,
            note: "补好了".to_owned(),
        },
        E::VerificationFailed {
            by: actor(Role::GridWorker),
            note: "坑还在".to_owned(),
            resolution_due: t(2000),
        },
        E::Verified {
            by: actor(Role::GridWorker),
        },
        E::Closed {
            by: actor(Role::GridWorker),
        },
        E::Rated {
            by: actor(Role::Resident),
            satisfaction: Satisfaction::BasicallySatisfied,
        },
        E::Reopened {
            by: actor(Role::City),
            reason: "又坏了".to_owned(),
            response_due: t(60),
            resolution_due: t(500),
        },
        E::Returned {
            by: actor(dept),
            handler: Handler::Department(shizheng()),
            reason: ReturnReason::WrongCategory,
            note: "不是我们的".to_owned(),
            rerouted_to: Handler::Street,
            source: RouteSource::Street,
            response_due: t(120),
            resolution_due: t(4200),
        },
        E::ExtensionRequested {
            by: actor(dept),
            minutes: 840,
            reason: "封路".to_owned(),
        },
        E::ExtensionApproved {
            by: actor(Role::Street),
            minutes: 840,
            resolution_due: t(5000),
        },
        E::ExtensionDenied {
            by: actor(Role::District),
            note: "不批".to_owned(),
        },
        E::Parked {
            by: actor(Role::Street),
            reason: "改造计划".to_owned(),
        },
        E::Unparked {
            by: actor(Role::Street),
            response_due: t(60),
            resolution_due: t(1260),
        },
        E::DuplicateMerged {
            by: actor(Role::System),
            duplicate: IncidentId(uuid::Uuid::from_u128(0xD0B)),
            reporter: ActorId(uuid::Uuid::from_u128(2)),
        },
        E::MergedInto {
            by: actor(Role::Community),
            original: IncidentId(uuid::Uuid::from_u128(0x0123)),
        },
        E::Cancelled {
            by: actor(Role::Resident),
        },
        E::DeadlineMissed {
            handler: Handler::GridWorker,
            deadline: DeadlineKind::Resolution,
            due: t(420),
        },
        E::WhistleBlown {
            kind: WhistleKind::Emergency,
            level: Level::Street,
            cause: WhistleCause::DeadlineMissed(DeadlineKind::Response),
            summoned: summoned.clone(),
            resolution_due: Some(t(480)),
        },
        E::WhistleReported {
            by: actor(dept),
            department: shizheng(),
            late: true,
        },
        E::WhistleReportMissed {
            department: shizheng(),
            due: t(30),
        },
        E::WhistleEscalated {
            kind: WhistleKind::Tough,
            from: Level::District,
            to: Level::City,
            cause: WhistleCause::ReportsMissed,
            summoned,
            resolution_due: None,
        },
        E::SubmissionTaken {
            submission_id: "app-2026-0001".to_owned(),
            kind: SubmissionKind::Complaint,
            channel: Channel::Hotline,
            occurred_at: t(-5),
            media: 2,
            respond_by: t(120),
        },
        E::WhistleSummonsWithdrawn {
            by: actor(Role::Street),
            department: shizheng(),
        },
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

#[test]
fn every_event_type_has_a_sample_and_a_golden_file() {
    let types: BTreeSet<&str> = samples()
        .iter()
        .map(|e| encode_event(e).event_type)
        .collect();
    let expected: BTreeSet<&str> = EVENT_TYPES.iter().copied().collect();
    assert_eq!(
        types, expected,
        "samples() must cover every event type exactly once"
    );
    assert_eq!(samples().len(), EVENT_TYPES.len());
    for event in samples() {
        assert_eq!(
            domain::encoding::event_type(&event),
            encode_event(&event).event_type
        );
    }
}

#[test]
fn golden_bytes_decode_forever() {
    let write = std::env::var("WANGGE_WRITE_GOLDEN").is_ok_and(|v| v == "1");
    for sample in samples() {
        let encoded = encode_event(&sample);
        let path = golden_dir().join(format!(
            "{}.v{}.bin",
            encoded.event_type, encoded.schema_version
        ));
        if write && !path.exists() {
            std::fs::create_dir_all(golden_dir()).expect("create golden dir");
            std::fs::write(&path, &encoded.payload).expect("write golden file");
        }
        let golden = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (write it once with WANGGE_WRITE_GOLDEN=1)",
                path.display()
            )
        });
        let decoded = decode_event(encoded.event_type, encoded.schema_version, &golden)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            decoded,
            sample,
            "{} decodes to a different event",
            path.display()
        );
        // While v1 is today's version, encoding is byte-identical to what was frozen.
        assert_eq!(
            encoded.payload,
            golden,
            "{} encoding drifted: add a v2 instead",
            path.display()
        );
    }
}

#[test]
fn every_golden_file_is_a_known_type_and_version() {
    let mut names: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    for name in &names {
        let stem = name.strip_suffix(".bin").expect("golden files end in .bin");
        let (event_type, version) = stem
            .rsplit_once(".v")
            .expect("name is <type>.v<version>.bin");
        let version: u16 = version.parse().expect("version number");
        let bytes = std::fs::read(golden_dir().join(name)).expect("read golden");
        decode_event(event_type, version, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert_eq!(names.len(), EVENT_TYPES.len());
}

#[test]
fn bad_input_is_a_typed_error() {
    let render = |r: Result<IncidentEvent, DecodeError>| match r {
        Ok(e) => format!("ok: {e:?}"),
        Err(e) => format!("error: {e}"),
    };
    let closed = encode_event(&IncidentEvent::Closed {
        by: actor(Role::GridWorker),
    });
    expect!["error: unknown event type \"incident.closed\" at schema version 9"]
        .assert_eq(&render(decode_event("incident.closed", 9, &closed.payload)));
    expect!["error: unknown event type \"incident.teleported\" at schema version 1"].assert_eq(
        &render(decode_event("incident.teleported", 1, &closed.payload)),
    );
    expect!["error: payload of incident.closed v1 is not valid postcard: Hit the end of buffer, expected more data"]
        .assert_eq(&render(decode_event("incident.closed", 1, &closed.payload[..3])));
    let mut long = closed.payload.clone();
    long.push(0);
    expect!["error: payload of incident.closed v1 has 1 trailing bytes"]
        .assert_eq(&render(decode_event("incident.closed", 1, &long)));
    let missed = encode_event(&IncidentEvent::WhistleReportMissed {
        department: shizheng(),
        due: t(0),
    });
    let mut bad = missed.payload.clone();
    bad[1] = b'S'; // "Shizheng": not a valid department id
    expect![[r#"error: payload of incident.whistle_report_missed v1 holds an invalid value: department id "Shizheng" must be 1..=15 bytes of a-z, 0-9 or '_'"#]]
        .assert_eq(&render(decode_event("incident.whistle_report_missed", 1, &bad)));
}
