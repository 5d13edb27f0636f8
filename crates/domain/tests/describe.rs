//! `domain::describe`: every event kind in words, as an inspector reads it in a timeline.

use domain::describe::{describe, describe_at};
use domain::incident::{
    DeadlineKind, Handler, IncidentEvent, Level, Position, RejectReason, ReturnReason, RouteSource,
    Satisfaction, Summoned, WhistleCause,
};
use domain::routing::WhistleKind;
use domain::{Actor, ActorId, Clock, IncidentId, Role, Timestamp};
use expect_test::{Expect, expect};

fn check(events: Vec<IncidentEvent>, expect: Expect) {
    let mut text = String::new();
    for event in &events {
        let description = describe(event);
        text.push_str(&format!("{:<22} {}", description.kind, description.summary));
        if let Some(reason) = &description.reason {
            text.push_str(&format!(" | reason: {reason}"));
        }
        if !description.concerns.is_empty() {
            text.push_str(&format!(" | concerns: {}", description.concerns.join(", ")));
        }
        text.push('\n');
    }
    expect.assert_eq(&text);
}

/// 2026-11-23T08:00:00Z plus `minutes`.
fn at(minutes: i64) -> Timestamp {
    Timestamp(1_795_420_800_000 + minutes * 60_000)
}

fn actor(role: Role) -> Actor {
    Actor {
        role,
        id: ActorId(uuid::Uuid::from_u128(7)),
    }
}

#[test]
fn a_case_that_climbs_the_ladder_reads_as_a_story() {
    let zhujian = "zhujian".parse().unwrap();
    let chengguan = "chengguan".parse().unwrap();
    let department = Handler::Department(zhujian);
    check(
        vec![
            IncidentEvent::Reported {
                incident: IncidentId(uuid::Uuid::from_u128(1)),
                by: actor(Role::Resident),
                description: "井盖缺失，路口东侧，夜间很危险，请尽快处理。".repeat(8),
                position: Some(Position {
                    lat_e7: 262_634_000,
                    lon_e7: 1_176_390_000,
                }),
                category_hint: Some("0101".parse().unwrap()),
            },
            IncidentEvent::Filed {
                by: actor(Role::System),
                grid: "350402001002007".parse().unwrap(),
                category: "0101".parse().unwrap(),
                emergency: false,
            },
            IncidentEvent::Dispatched {
                by: actor(Role::System),
                handler: department,
                source: RouteSource::Table,
                clock: Clock::Working,
                response_due: at(120),
                resolution_due: at(2 * 24 * 60),
            },
            IncidentEvent::DeadlineMissed {
                handler: department,
                deadline: DeadlineKind::Response,
                due: at(120),
            },
            IncidentEvent::WhistleBlown {
                kind: WhistleKind::Routine,
                level: Level::Street,
                cause: WhistleCause::DeadlineMissed(DeadlineKind::Response),
                summoned: vec![
                    Summoned {
                        department: zhujian,
                        report_by: at(240),
                    },
                    Summoned {
                        department: chengguan,
                        report_by: at(240),
                    },
                ],
                resolution_due: Some(at(3 * 24 * 60)),
            },
            IncidentEvent::WhistleReported {
                by: actor(Role::Department(chengguan)),
                department: chengguan,
                late: false,
            },
            IncidentEvent::WhistleReportMissed {
                department: zhujian,
                due: at(240),
            },
            IncidentEvent::WhistleEscalated {
                kind: WhistleKind::Tough,
                from: Level::Street,
                to: Level::District,
                cause: WhistleCause::ReportsMissed,
                summoned: vec![Summoned {
                    department: zhujian,
                    report_by: at(360),
                }],
                resolution_due: None,
            },
            IncidentEvent::Returned {
                by: actor(Role::Department(zhujian)),
                handler: department,
                reason: ReturnReason::NotOurDuty,
                note: "井盖属于燃气公司".to_owned(),
                rerouted_to: Handler::Street,
                source: RouteSource::Street,
                response_due: at(400),
                resolution_due: at(5000),
            },
            IncidentEvent::ExtensionRequested {
                by: actor(Role::Street),
                minutes: 240,
                reason: "waiting for parts".to_owned(),
            },
            IncidentEvent::ExtensionApproved {
                by: actor(Role::District),
                minutes: 240,
                resolution_due: at(5240),
            },
            IncidentEvent::Acknowledged {
                by: actor(Role::Street),
                late: true,
            },
            IncidentEvent::Resolved {
                by: actor(Role::Street),
                late: false,
                note: "".to_owned(),
            },
            IncidentEvent::VerificationFailed {
                by: actor(Role::GridWorker),
                note: "still open".to_owned(),
                resolution_due: at(6000),
            },
            IncidentEvent::Verified {
                by: actor(Role::GridWorker),
            },
            IncidentEvent::Closed {
                by: actor(Role::System),
            },
            IncidentEvent::Rated {
                by: actor(Role::Resident),
                satisfaction: Satisfaction::BasicallySatisfied,
            },
            IncidentEvent::ReportRejected {
                by: actor(Role::Community),
                reason: RejectReason::NotAGovernmentMatter,
                note: "private dispute".to_owned(),
            },
        ],
        expect![[r#"
            reported               Incident 00000000-0000-0000-0000-000000000001 reported at lon 117.639000, lat 26.263400, category 0101: "井盖缺失，路口东侧，夜间很危险，请尽快处理。井盖缺失，路口东侧，夜间很危险，请尽快处理。井盖缺失，路口东侧，夜间很危险，请尽快处理。井盖缺失，路口东侧，夜间很危…"
            filed                  Filed in grid 350402001002007 as category 0101
            dispatched             Assigned to department zhujian (by the routing table); respond by 2026-11-23T10:00:00Z, resolve by 2026-11-25T08:00:00Z | concerns: department:zhujian
            deadline_missed        Department zhujian missed the response deadline of 2026-11-23T10:00:00Z | concerns: department:zhujian
            whistle_blown          Routine whistle (日常哨) blown by the street (街道) (response deadline missed): summoned department zhujian to report by 2026-11-23T12:00:00Z, department chengguan to report by 2026-11-23T12:00:00Z; joint resolution by 2026-11-26T08:00:00Z | concerns: department:zhujian, department:chengguan
            whistle_reported       Department chengguan reported to the whistle | concerns: department:chengguan
            whistle_report_missed  Department zhujian did not report by 2026-11-23T12:00:00Z | concerns: department:zhujian
            whistle_escalated      Tough-case whistle (攻坚哨) escalated from the street (街道) to the district (区) (summoned departments did not report); summoned department zhujian to report by 2026-11-23T14:00:00Z | concerns: department:zhujian
            returned               Department zhujian returned the case (not our duty); re-routed to the street office (back to the street, no fallback left); respond by 2026-11-23T14:40:00Z, resolve by 2026-11-26T19:20:00Z | reason: 井盖属于燃气公司 | concerns: department:zhujian, street
            extension_requested    Handler asked for 240 more minutes | reason: waiting for parts
            extension_approved     Extension of 240 minutes approved; resolve by 2026-11-26T23:20:00Z
            acknowledged           Handler acknowledged the case, late
            resolved               Handler reported the case resolved
            verification_failed    Verification failed; to be resolved again by 2026-11-27T12:00:00Z | reason: still open
            verified               Resolution verified on site
            closed                 Case closed
            rated                  Reporter rated the handling: basically satisfied (基本满意)
            report_rejected        Report not taken up: not a government matter | reason: private dispute
        "#]],
    );
}

/// At the city's offset every time in a sentence is local, with its offset; at 0 it is UTC.
#[test]
fn times_read_at_the_city_offset() {
    let event = IncidentEvent::WhistleBlown {
        kind: WhistleKind::Routine,
        level: Level::Street,
        cause: WhistleCause::DeadlineMissed(DeadlineKind::Response),
        summoned: vec![Summoned {
            department: "zhujian".parse().unwrap(),
            report_by: at(240),
        }],
        resolution_due: Some(at(3 * 24 * 60)),
    };
    let eight_hours_ms = 8 * 3_600_000;
    let lines: Vec<String> = [0, eight_hours_ms, -(5 * 3_600_000 + 30 * 60_000)]
        .into_iter()
        .map(|offset| describe_at(&event, offset).summary)
        .collect();
    expect![[r#"
        Routine whistle (日常哨) blown by the street (街道) (response deadline missed): summoned department zhujian to report by 2026-11-23T12:00:00Z; joint resolution by 2026-11-26T08:00:00Z
        Routine whistle (日常哨) blown by the street (街道) (response deadline missed): summoned department zhujian to report by 2026-11-23T20:00:00+08:00; joint resolution by 2026-11-26T16:00:00+08:00
        Routine whistle (日常哨) blown by the street (街道) (response deadline missed): summoned department zhujian to report by 2026-11-23T06:30:00-05:30; joint resolution by 2026-11-26T02:30:00-05:30"#]].assert_eq(&lines.join("\n"));
    assert_eq!(describe_at(&event, 0), describe(&event));
    // A time whose local date would pass the year 9999 reads in UTC, never a panic.
    let lines: Vec<String> = [253_402_300_799_999, i64::MAX]
        .into_iter()
        .map(|due| {
            let missed = IncidentEvent::WhistleReportMissed {
                department: "zhujian".parse().unwrap(),
                due: Timestamp(due),
            };
            describe_at(&missed, eight_hours_ms).summary
        })
        .collect();
    expect![[r#"
        Department zhujian did not report by 9999-12-31T23:59:59Z
        Department zhujian did not report by 9223372036854775807ms"#]]
    .assert_eq(&lines.join("\n"));
}

/// Given the routing table's names, every sentence that mentions a department names it; an
/// id the table does not know reads as the id alone.
#[test]
fn departments_are_named_where_the_city_knows_them() {
    let zhujian: domain::DepartmentId = "zhujian".parse().unwrap();
    let unknown: domain::DepartmentId = "gongan".parse().unwrap();
    let names = |id: domain::DepartmentId| {
        (id.to_string() == "zhujian").then(|| "住房和城乡建设局".to_owned())
    };
    let events = [
        IncidentEvent::Dispatched {
            by: actor(Role::System),
            handler: Handler::Department(zhujian),
            source: RouteSource::Table,
            clock: Clock::Working,
            response_due: at(60),
            resolution_due: at(24 * 60),
        },
        IncidentEvent::WhistleBlown {
            kind: WhistleKind::Tough,
            level: Level::Street,
            cause: WhistleCause::DeadlineMissed(DeadlineKind::Resolution),
            summoned: vec![
                Summoned {
                    department: zhujian,
                    report_by: at(240),
                },
                Summoned {
                    department: unknown,
                    report_by: at(240),
                },
            ],
            resolution_due: None,
        },
        IncidentEvent::WhistleReported {
            department: zhujian,
            by: actor(Role::Department(zhujian)),
            late: false,
        },
        IncidentEvent::WhistleReportMissed {
            department: unknown,
            due: at(240),
        },
        IncidentEvent::DeadlineMissed {
            handler: Handler::Department(zhujian),
            deadline: DeadlineKind::Response,
            due: at(60),
        },
    ];
    let lines: Vec<String> = events
        .iter()
        .map(|event| domain::describe::describe_named(event, 0, &names).summary)
        .collect();
    expect![[r#"
        Assigned to department zhujian [住房和城乡建设局] (by the routing table); respond by 2026-11-23T09:00:00Z, resolve by 2026-11-24T08:00:00Z
        Tough-case whistle (攻坚哨) blown by the street (街道) (resolution deadline missed): summoned department zhujian [住房和城乡建设局] to report by 2026-11-23T12:00:00Z, department gongan to report by 2026-11-23T12:00:00Z
        Department zhujian [住房和城乡建设局] reported to the whistle
        Department gongan did not report by 2026-11-23T12:00:00Z
        Department zhujian [住房和城乡建设局] missed the response deadline of 2026-11-23T09:00:00Z"#]].assert_eq(&lines.join("\n"));
}
