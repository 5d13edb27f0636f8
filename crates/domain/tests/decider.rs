//! Every transition and every rejection of the incident decider, as snapshots.
//!
//! `check(given, when, expect)` folds `given` into a state, runs `when` at [`NOW`] and renders
//! the resulting events (or the rejection) as text. Histories are built by running commands
//! through the same decider ([`Story`]), so a given is always a history the system could write.

use domain::incident::{
    Action, Channel, DeadlineKind, Handler, IncidentCommand, IncidentEvent, IncidentState,
    Position, RejectReason, ReturnReason, Satisfaction, SubmissionKind, decide, next_deadline,
};
use domain::{
    Actor, ActorId, CategoryCode, DepartmentId, GridCode, IncidentId, Policy, Role, Timestamp,
};
use expect_test::{Expect, expect};

/// Tuesday 2026-03-10 10:00 in Sanming (UTC+8).
const T0: Timestamp = Timestamp(1_773_108_000_000);
const MINUTE: i64 = 60_000;
/// When `check` runs its command: one hour after the story started.
const NOW: Timestamp = Timestamp(T0.0 + 60 * MINUTE);
/// A minute before the response deadline of a case dispatched at [`T0`] with a one-hour
/// response time (which falls due at [`NOW`]).
const BEFORE_RESPONSE_DUE: Timestamp = Timestamp(NOW.0 - MINUTE);

fn policy() -> &'static Policy {
    static POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| Policy::embedded("sanming").expect("embedded sanming policy"))
}

fn actor(role: Role, n: u128) -> Actor {
    Actor {
        role,
        id: ActorId(uuid::Uuid::from_u128(n)),
    }
}
fn dept(name: &str) -> DepartmentId {
    name.parse().expect("department id")
}
fn resident() -> Actor {
    actor(Role::Resident, 1)
}
fn neighbour() -> Actor {
    actor(Role::Resident, 2)
}
fn grid_worker() -> Actor {
    actor(Role::GridWorker, 3)
}
fn community() -> Actor {
    actor(Role::Community, 4)
}
fn street() -> Actor {
    actor(Role::Street, 5)
}
fn district() -> Actor {
    actor(Role::District, 6)
}
fn system() -> Actor {
    actor(Role::System, 8)
}
fn department(name: &str) -> Actor {
    actor(Role::Department(dept(name)), 9)
}
fn category(code: &str) -> CategoryCode {
    code.parse().expect("category code")
}
/// A grid in street 350404002 (no street overrides).
fn grid() -> GridCode {
    "350404002001001".parse().expect("grid code")
}
fn incident_id() -> IncidentId {
    IncidentId(uuid::Uuid::from_u128(0xCA5E))
}

/// Renders ids and timestamps short: `Resident#1` for actors, `#2` for bare actor ids, local
/// time for timestamps, bare names for departments.
fn render(text: String) -> String {
    const ACTOR: &str = "Actor { role: ";
    const ACTOR_ID: &str = "ActorId(00000000-0000-0000-0000-";
    let mut out = String::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(ACTOR)
            && let Some(split) = after.find(", id: ActorId(")
        {
            let role = render(after[..split].to_owned());
            let id_and_tail = &after[split + ", id: ".len()..];
            let end = id_and_tail.find(") }").unwrap_or(id_and_tail.len());
            let id = render(id_and_tail[..(end + 1).min(id_and_tail.len())].to_owned());
            out.push_str(&format!("{role}{id}"));
            rest = &id_and_tail[(end + 3).min(id_and_tail.len())..];
        } else if let Some(after) = rest.strip_prefix(ACTOR_ID) {
            let (hex, tail) = after.split_at(12.min(after.len()));
            out.push_str(&format!("#{}", u128::from_str_radix(hex, 16).unwrap_or(0)));
            rest = tail.strip_prefix(')').unwrap_or(tail);
        } else if let Some(after) = rest.strip_prefix("Timestamp(") {
            let end = after.find(')').unwrap_or(after.len());
            let ms: i64 = after[..end].parse().unwrap_or(0);
            let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
                .map(|t| t.to_offset(time::macros::offset!(+8)))
                .map(|t| format!("{} {:02}:{:02}", t.date(), t.hour(), t.minute()))
                .unwrap_or_default();
            out.push_str(&t);
            rest = &after[(end + 1).min(after.len())..];
        } else if let Some(after) = rest.strip_prefix("DepartmentId(\"") {
            let end = after.find("\")").unwrap_or(after.len());
            out.push_str(&after[..end]);
            rest = &after[(end + 2).min(after.len())..];
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn render_result(result: Result<Vec<IncidentEvent>, domain::Rejection>) -> String {
    match result {
        Ok(events) => events
            .iter()
            .map(|e| render(format!("{e:?}")) + "\n")
            .collect(),
        Err(rejection) => render(format!("rejected: {rejection}\n  {rejection:?}\n")),
    }
}

fn check_at(given: &[IncidentEvent], now: Timestamp, actor: Actor, action: Action, expect: Expect) {
    let state = IncidentState::from_events(given);
    let result = decide(&state, IncidentCommand { actor, action }, now, policy());
    if let Ok(events) = &result {
        // Every accepted command leaves a state the decider can keep working with.
        let after = events.iter().fold(state, domain::evolve);
        assert!(next_deadline(&after).is_none_or(|t| t > now || after.whistle.is_some()));
    }
    expect.assert_eq(&render_result(result));
}

fn check(given: &[IncidentEvent], actor: Actor, action: Action, expect: Expect) {
    check_at(given, NOW, actor, action, expect);
}

/// A history built by running commands.
#[derive(Clone)]
struct Story {
    events: Vec<IncidentEvent>,
    now: Timestamp,
    policy: &'static Policy,
}

impl Story {
    fn new() -> Story {
        Story {
            events: Vec::new(),
            now: T0,
            policy: policy(),
        }
    }
    fn then(mut self, actor: Actor, action: Action) -> Story {
        let state = IncidentState::from_events(&self.events);
        let what = format!("{action:?}");
        match decide(
            &state,
            IncidentCommand { actor, action },
            self.now,
            self.policy,
        ) {
            Ok(events) => self.events.extend(events),
            Err(e) => panic!("story step {what} rejected: {e}"),
        }
        self
    }
    fn after_minutes(mut self, minutes: i64) -> Story {
        self.now = Timestamp(self.now.0 + minutes * MINUTE);
        self
    }
    fn reported() -> Story {
        Story::new().then(
            resident(),
            Action::Report {
                incident: incident_id(),
                description: "路面有个大坑".to_owned(),
                position: Some(Position {
                    lat_e7: 262_650_000,
                    lon_e7: 1_176_390_000,
                }),
                category_hint: None,
            },
        )
    }
    fn filed(code: &str) -> Story {
        Story::reported().then(
            system(),
            Action::File {
                grid: grid(),
                category: category(code),
            },
        )
    }
    fn dispatched(code: &str) -> Story {
        Story::filed(code).then(system(), Action::Dispatch { to: None })
    }
    /// A pothole (1201) at the municipal maintenance centre, acknowledged.
    fn acknowledged() -> Story {
        Story::dispatched("1201").then(department("shizheng"), Action::Acknowledge)
    }
    fn resolved() -> Story {
        Story::acknowledged().then(
            department("shizheng"),
            Action::Resolve {
                note: "补好了".to_owned(),
            },
        )
    }
    fn closed() -> Story {
        Story::resolved().then(
            grid_worker(),
            Action::Verify {
                passed: true,
                note: String::new(),
            },
        )
    }
}

fn report() -> Action {
    Action::Report {
        incident: incident_id(),
        description: "垃圾堆在路边".to_owned(),
        position: None,
        category_hint: Some(category("0101")),
    }
}

#[test]
fn report_and_file() {
    check(
        &[],
        resident(),
        report(),
        expect![[r#"
        Reported { incident: IncidentId(00000000-0000-0000-0000-00000000ca5e), by: Resident#1, description: "垃圾堆在路边", position: None, category_hint: Some(CategoryCode { class: 1, subclass: 1 }) }
    "#]],
    );
    check(
        &Story::reported().events,
        resident(),
        report(),
        expect![[r#"
        rejected: an incident with this id already exists
          AlreadyExists
    "#]],
    );
    check(
        &[],
        department("shizheng"),
        report(),
        expect![[r#"
        rejected: role department:shizheng may not report
          Forbidden { command: "report", role: Department(shizheng) }
    "#]],
    );
    let long = Action::Report {
        incident: incident_id(),
        description: "坑".repeat(5_400),
        position: None,
        category_hint: None,
    };
    check(
        &[],
        resident(),
        long,
        expect![[r#"
        rejected: description is 16200 bytes, more than 16000
          TextTooLong { field: "description", bytes: 16200, max: 16000 }
    "#]],
    );
    let empty = Action::Report {
        incident: incident_id(),
        description: " ".to_owned(),
        position: None,
        category_hint: None,
    };
    check(
        &[],
        resident(),
        empty,
        expect![[r#"
        rejected: description must not be empty
          EmptyText { field: "description" }
    "#]],
    );
    let given = Story::reported().events;
    check(
        &given,
        system(),
        Action::File {
            grid: grid(),
            category: category("1201"),
        },
        expect![[r#"
        Filed { by: System#8, grid: GridCode(350404002001001), category: CategoryCode { class: 12, subclass: 1 }, emergency: false }
    "#]],
    );
    check(
        &given,
        community(),
        Action::File {
            grid: grid(),
            category: category("12"),
        },
        expect![[r#"
        rejected: category 12 is not a fileable category of the taxonomy
          UnknownCategory(CategoryCode { class: 12, subclass: 0 })
    "#]],
    );
    check(
        &given,
        resident(),
        Action::File {
            grid: grid(),
            category: category("1201"),
        },
        expect![[r#"
        rejected: role resident may not file
          Forbidden { command: "file", role: Resident }
    "#]],
    );
    check(
        &[],
        system(),
        Action::File {
            grid: grid(),
            category: category("1201"),
        },
        expect![[r#"
        rejected: no incident has been reported under this id
          NoSuchIncident
    "#]],
    );
    check(
        &given,
        street(),
        Action::RejectReport {
            reason: RejectReason::OutsideJurisdiction,
            note: "不在本市".to_owned(),
        },
        expect![[r#"
        ReportRejected { by: Street#5, reason: OutsideJurisdiction, note: "不在本市" }
    "#]],
    );
    check(
        &Story::filed("1201").events,
        street(),
        Action::RejectReport {
            reason: RejectReason::Malicious,
            note: String::new(),
        },
        expect![[r#"
        rejected: reject_report is not possible while the incident is Filed
          InvalidTransition { command: "reject_report", status: Filed }
    "#]],
    );
}

fn take_submission(submission_id: &str) -> Action {
    Action::TakeSubmission {
        submission_id: submission_id.to_owned(),
        kind: SubmissionKind::Complaint,
        channel: Channel::Hotline,
        occurred_at: Timestamp(1_795_000_000_000),
        media: 2,
        respond_by: Timestamp(1_795_007_200_000),
    }
}

#[test]
fn take_submission_right_after_filing() {
    let filed = Story::filed("1201").events;
    check(
        &filed,
        system(),
        take_submission("hotline-0001"),
        expect![[r#"
            SubmissionTaken { submission_id: "hotline-0001", kind: Complaint, channel: Hotline, occurred_at: 2026-11-18 19:06, media: 2, respond_by: 2026-11-18 21:06 }
        "#]],
    );
    check(
        &filed,
        community(),
        take_submission("hotline-0001"),
        expect![[r#"
            rejected: role community may not take_submission
              Forbidden { command: "take_submission", role: Community }
        "#]],
    );
    check(
        &Story::reported().events,
        system(),
        take_submission("hotline-0001"),
        expect![[r#"
            rejected: take_submission is not possible while the incident is Reported
              InvalidTransition { command: "take_submission", status: Reported }
        "#]],
    );
    check(
        &filed,
        system(),
        take_submission(" "),
        expect![[r#"
        rejected: submission_id must not be empty
          EmptyText { field: "submission_id" }
    "#]],
    );
    check(
        &filed,
        system(),
        take_submission(&"x".repeat(65)),
        expect![[r#"
            rejected: submission_id is 65 bytes, more than 64
              TextTooLong { field: "submission_id", bytes: 65, max: 64 }
        "#]],
    );
}

#[test]
fn dispatch_by_table_override_and_hand() {
    let filed = Story::filed("1201").events;
    check(
        &filed,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
        Dispatched { by: System#8, handler: Department(shizheng), source: Table, clock: Working, response_due: 2026-03-10 12:00, resolution_due: 2026-03-13 11:00 }
    "#]],
    );
    // A grid-worker category (exposed rubbish).
    check(
        &Story::filed("0101").events,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
        Dispatched { by: System#8, handler: GridWorker, source: Table, clock: Working, response_due: 2026-03-10 12:00, resolution_due: 2026-03-11 11:00 }
    "#]],
    );
    // Illegal parking in street 350404001, which overrides the route.
    let in_override = Story::reported()
        .then(
            system(),
            Action::File {
                grid: "350404001002003".parse().expect("grid"),
                category: category("0504"),
            },
        )
        .events;
    check(
        &in_override,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
        Dispatched { by: System#8, handler: Street, source: StreetOverride, clock: Working, response_due: 2026-03-10 11:30, resolution_due: 2026-03-10 16:30 }
    "#]],
    );
    check(
        &filed,
        street(),
        Action::Dispatch {
            to: Some(Handler::Department(dept("chengguan"))),
        },
        expect![[r#"
        Dispatched { by: Street#5, handler: Department(chengguan), source: Manual, clock: Working, response_due: 2026-03-10 12:00, resolution_due: 2026-03-13 11:00 }
    "#]],
    );
    check(
        &filed,
        system(),
        Action::Dispatch {
            to: Some(Handler::Street),
        },
        expect![[r#"
        rejected: role system may not dispatch
          Forbidden { command: "dispatch", role: System }
    "#]],
    );
    check(
        &filed,
        street(),
        Action::Dispatch {
            to: Some(Handler::Department(dept("nobody"))),
        },
        expect![[r#"
        rejected: department nobody is not in the routing table
          UnknownDepartment(nobody)
    "#]],
    );
    check(
        &filed,
        department("shizheng"),
        Action::Dispatch { to: None },
        expect![[r#"
        rejected: role department:shizheng may not dispatch
          Forbidden { command: "dispatch", role: Department(shizheng) }
    "#]],
    );
    // Reassignment of a dispatched case by the street, before its response deadline (NOW);
    // after it, see `misses_past_at_the_command_are_recorded_first`.
    let dispatched = Story::dispatched("1201").events;
    check_at(
        &dispatched,
        BEFORE_RESPONSE_DUE,
        street(),
        Action::Dispatch {
            to: Some(Handler::Department(dept("jiaojing"))),
        },
        expect![[r#"
            Dispatched { by: Street#5, handler: Department(jiaojing), source: Manual, clock: Working, response_due: 2026-03-10 11:59, resolution_due: 2026-03-13 10:59 }
        "#]],
    );
    check(
        &dispatched,
        street(),
        Action::Dispatch {
            to: Some(Handler::Department(dept("shizheng"))),
        },
        expect![[r#"
        rejected: the case is already assigned to department:shizheng
          SameHandler(Department(shizheng))
    "#]],
    );
    check(
        &dispatched,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
        rejected: role system may not dispatch
          Forbidden { command: "dispatch", role: System }
    "#]],
    );
    check(
        &Story::reported().events,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
        rejected: dispatch is not possible while the incident is Reported
          InvalidTransition { command: "dispatch", status: Reported }
    "#]],
    );
}

#[test]
fn emergency_blows_the_whistle_at_once() {
    check(
        &Story::filed("0401").events,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
        Dispatched { by: System#8, handler: Department(shizheng), source: Table, clock: Wall, response_due: 2026-03-10 11:30, resolution_due: 2026-03-10 19:00 }
        WhistleBlown { kind: Emergency, level: Street, cause: Emergency, summoned: [Summoned { department: shizheng, report_by: 2026-03-10 11:30 }, Summoned { department: yingji, report_by: 2026-03-10 11:30 }, Summoned { department: jiaojing, report_by: 2026-03-10 11:30 }], resolution_due: None }
    "#]],
    );
}

#[test]
fn acknowledge_resolve_verify_close_rate() {
    let dispatched = Story::dispatched("1201").events;
    check_at(
        &dispatched,
        BEFORE_RESPONSE_DUE,
        department("shizheng"),
        Action::Acknowledge,
        expect![[r#"
        Acknowledged { by: Department(shizheng)#9, late: false }
    "#]],
    );
    // Late, before the shell recorded the miss: the miss is recorded first, with the whistle
    // it blows, and acknowledging reports to that whistle, as had the shell decided first.
    check_at(
        &dispatched,
        Timestamp(NOW.0 + 3 * 60 * MINUTE),
        department("shizheng"),
        Action::Acknowledge,
        expect![[r#"
            DeadlineMissed { handler: Department(shizheng), deadline: Response, due: 2026-03-10 11:00 }
            WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Response), summoned: [Summoned { department: shizheng, report_by: 2026-03-10 16:00 }], resolution_due: None }
            Acknowledged { by: Department(shizheng)#9, late: true }
            WhistleReported { by: Department(shizheng)#9, department: shizheng, late: false }
        "#]],
    );
    check(
        &dispatched,
        department("chengguan"),
        Action::Acknowledge,
        expect![[r#"
        rejected: department:chengguan may not acknowledge: the case is neither assigned to it nor summoned it
          NotAssigned { command: "acknowledge", role: Department(chengguan) }
    "#]],
    );
    check(
        &dispatched,
        district(),
        Action::Acknowledge,
        expect![[r#"
        rejected: role district may not acknowledge
          Forbidden { command: "acknowledge", role: District }
    "#]],
    );
    check(
        &dispatched,
        department("shizheng"),
        Action::Resolve {
            note: String::new(),
        },
        expect![[r#"
        rejected: the handler has not acknowledged the case
          NotAcknowledged
    "#]],
    );
    // A department that is not the handler is told so whatever the state: it learns nothing
    // of where another department's case stands (here acknowledged, then closed).
    for story in [Story::acknowledged(), Story::closed()] {
        check(
            &story.events,
            department("zhujian"),
            Action::Acknowledge,
            expect![[r#"
                rejected: department:zhujian may not acknowledge: the case is neither assigned to it nor summoned it
                  NotAssigned { command: "acknowledge", role: Department(zhujian) }
            "#]],
        );
        check(
            &story.events,
            department("zhujian"),
            Action::RequestExtension {
                minutes: 60,
                reason: "材料未到".to_owned(),
            },
            expect![[r#"
                rejected: department:zhujian may not request_extension: the case is neither assigned to it nor summoned it
                  NotAssigned { command: "request_extension", role: Department(zhujian) }
            "#]],
        );
    }
    let acknowledged = Story::acknowledged().events;
    check(
        &acknowledged,
        department("shizheng"),
        Action::Acknowledge,
        expect![[r#"
        rejected: acknowledge is not possible while the incident is Acknowledged
          InvalidTransition { command: "acknowledge", status: Acknowledged }
    "#]],
    );
    check(
        &acknowledged,
        department("shizheng"),
        Action::Resolve {
            note: "补好了".to_owned(),
        },
        expect![[r#"
        Resolved { by: Department(shizheng)#9, late: false, note: "补好了" }
    "#]],
    );
    let resolved = Story::resolved().events;
    check(
        &resolved,
        grid_worker(),
        Action::Verify {
            passed: true,
            note: String::new(),
        },
        expect![[r#"
        Verified { by: GridWorker#3 }
        Closed { by: GridWorker#3 }
    "#]],
    );
    check(
        &resolved,
        grid_worker(),
        Action::Verify {
            passed: false,
            note: "坑还在".to_owned(),
        },
        expect![[r#"
        VerificationFailed { by: GridWorker#3, note: "坑还在", resolution_due: 2026-03-13 11:00 }
    "#]],
    );
    check(
        &resolved,
        grid_worker(),
        Action::Verify {
            passed: false,
            note: String::new(),
        },
        expect![[r#"
        rejected: note must not be empty
          EmptyText { field: "note" }
    "#]],
    );
    check(
        &resolved,
        department("shizheng"),
        Action::Verify {
            passed: true,
            note: String::new(),
        },
        expect![[r#"
        rejected: role department:shizheng may not verify
          Forbidden { command: "verify", role: Department(shizheng) }
    "#]],
    );
    let closed = Story::closed().events;
    check(
        &closed,
        resident(),
        Action::Rate {
            satisfaction: Satisfaction::Satisfied,
            reopen: false,
        },
        expect![[r#"
        Rated { by: Resident#1, satisfaction: Satisfied }
    "#]],
    );
    check(
        &closed,
        resident(),
        Action::Rate {
            satisfaction: Satisfaction::Unsatisfied,
            reopen: true,
        },
        expect![[r#"
        Rated { by: Resident#1, satisfaction: Unsatisfied }
        Reopened { by: Resident#1, reason: "resident unsatisfied", response_due: 2026-03-10 12:00, resolution_due: 2026-03-13 11:00 }
    "#]],
    );
    check(
        &closed,
        neighbour(),
        Action::Rate {
            satisfaction: Satisfaction::Satisfied,
            reopen: false,
        },
        expect![[r#"
        rejected: only a reporter of this incident may rate
          NotReporter { command: "rate" }
    "#]],
    );
    let rated = Story::closed()
        .then(
            resident(),
            Action::Rate {
                satisfaction: Satisfaction::BasicallySatisfied,
                reopen: false,
            },
        )
        .events;
    check(
        &rated,
        resident(),
        Action::Rate {
            satisfaction: Satisfaction::Satisfied,
            reopen: false,
        },
        expect![[r#"
        rejected: the incident was already rated
          AlreadyRated
    "#]],
    );
    check(
        &closed,
        street(),
        Action::Reopen {
            reason: "又坏了".to_owned(),
        },
        expect![[r#"
        Reopened { by: Street#5, reason: "又坏了", response_due: 2026-03-10 12:00, resolution_due: 2026-03-13 11:00 }
    "#]],
    );
    let mut story = Story::closed();
    for _ in 0..3 {
        story = story
            .then(
                street(),
                Action::Reopen {
                    reason: "又坏了".to_owned(),
                },
            )
            .then(department("shizheng"), Action::Acknowledge)
            .then(
                department("shizheng"),
                Action::Resolve {
                    note: String::new(),
                },
            )
            .then(
                grid_worker(),
                Action::Verify {
                    passed: true,
                    note: String::new(),
                },
            );
    }
    check(
        &story.events,
        street(),
        Action::Reopen {
            reason: "又坏了".to_owned(),
        },
        expect![[r#"
        rejected: the incident was already reopened 3 times
          ReopensExhausted
    "#]],
    );
    check(
        &story.events,
        resident(),
        Action::Rate {
            satisfaction: Satisfaction::Unsatisfied,
            reopen: true,
        },
        expect![[r#"
        rejected: the incident was already reopened 3 times
          ReopensExhausted
    "#]],
    );
    check(
        &acknowledged,
        street(),
        Action::Reopen {
            reason: "x".to_owned(),
        },
        expect![[r#"
        rejected: reopen is not possible while the incident is Acknowledged
          InvalidTransition { command: "reopen", status: Acknowledged }
    "#]],
    );
}

#[test]
fn return_not_ours() {
    // Illegal building: the urban management bureau returns it, the fallback takes it.
    let dispatched = Story::dispatched("0304").events;
    let not_ours = || Action::ReturnNotOurs {
        reason: ReturnReason::NotOurDuty,
        note: "属于违法占地".to_owned(),
    };
    check(
        &dispatched,
        department("chengguan"),
        not_ours(),
        expect![[r#"
        Returned { by: Department(chengguan)#9, handler: Department(chengguan), reason: NotOurDuty, note: "属于违法占地", rerouted_to: Department(ziranziyuan), source: Fallback, response_due: 2026-03-10 14:30, resolution_due: 2026-03-24 11:00 }
    "#]],
    );
    // ... and when the fallback returns it too, it goes back to the street (属地).
    let twice = Story::dispatched("0304")
        .then(department("chengguan"), not_ours())
        .events;
    check(
        &twice,
        department("ziranziyuan"),
        not_ours(),
        expect![[r#"
        Returned { by: Department(ziranziyuan)#9, handler: Department(ziranziyuan), reason: NotOurDuty, note: "属于违法占地", rerouted_to: Street, source: Street, response_due: 2026-03-10 14:30, resolution_due: 2026-03-24 11:00 }
    "#]],
    );
    let at_street = Story::dispatched("0304")
        .then(department("chengguan"), not_ours())
        .then(department("ziranziyuan"), not_ours())
        .events;
    check(
        &at_street,
        street(),
        not_ours(),
        expect![[r#"
        rejected: the street owns its cases and reassigns them instead of returning them
          StreetCannotReturn
    "#]],
    );
    check(
        &twice,
        department("chengguan"),
        not_ours(),
        expect![[r#"
        rejected: department:chengguan may not return_not_ours: the case is neither assigned to it nor summoned it
          NotAssigned { command: "return_not_ours", role: Department(chengguan) }
    "#]],
    );
    // A grid worker hands a case up to the responsible department (before its response
    // deadline).
    check_at(
        &Story::dispatched("0101").events,
        BEFORE_RESPONSE_DUE,
        grid_worker(),
        Action::ReturnNotOurs {
            reason: ReturnReason::NotOurDuty,
            note: "需要清运车".to_owned(),
        },
        expect![[r#"
            Returned { by: GridWorker#3, handler: GridWorker, reason: NotOurDuty, note: "需要清运车", rerouted_to: Department(chengguan), source: Table, response_due: 2026-03-10 11:59, resolution_due: 2026-03-11 10:59 }
        "#]],
    );
    check(
        &dispatched,
        department("chengguan"),
        Action::ReturnNotOurs {
            reason: ReturnReason::WrongLocation,
            note: String::new(),
        },
        expect![[r#"
        rejected: note must not be empty
          EmptyText { field: "note" }
    "#]],
    );
    let mut story = Story::dispatched("0304");
    let handlers = ["chengguan", "ziranziyuan"];
    for h in handlers {
        story = story.then(department(h), not_ours());
    }
    for h in handlers {
        story = story
            .then(
                street(),
                Action::Dispatch {
                    to: Some(Handler::Department(dept(h))),
                },
            )
            .then(department(h), not_ours());
    }
    check(
        &story.events,
        street(),
        Action::Dispatch {
            to: Some(Handler::Department(dept("zhujian"))),
        },
        expect![[r#"
        Dispatched { by: Street#5, handler: Department(zhujian), source: Manual, clock: Working, response_due: 2026-03-10 14:30, resolution_due: 2026-03-24 11:00 }
    "#]],
    );
    let story = story.then(
        street(),
        Action::Dispatch {
            to: Some(Handler::Department(dept("zhujian"))),
        },
    );
    check(
        &story.events,
        department("zhujian"),
        not_ours(),
        expect![[r#"
        rejected: the case was already returned 4 times; the street must decide
          ReturnsExhausted
    "#]],
    );
}

#[test]
fn extensions() {
    let acknowledged = Story::acknowledged().events;
    let request = || Action::RequestExtension {
        minutes: 840,
        reason: "需要封路施工".to_owned(),
    };
    check(
        &acknowledged,
        department("shizheng"),
        request(),
        expect![[r#"
        ExtensionRequested { by: Department(shizheng)#9, minutes: 840, reason: "需要封路施工" }
    "#]],
    );
    check(
        &acknowledged,
        department("shizheng"),
        Action::RequestExtension {
            minutes: 0,
            reason: "x".to_owned(),
        },
        expect![[r#"
        rejected: extension of 0 minutes is outside 1..=12600
          ExtensionMinutes { minutes: 0 }
    "#]],
    );
    check(
        &acknowledged,
        street(),
        Action::DecideExtension {
            approve: true,
            note: String::new(),
        },
        expect![[r#"
        rejected: no extension request is pending
          NoExtensionPending
    "#]],
    );
    let requested = Story::acknowledged()
        .then(department("shizheng"), request())
        .events;
    check(
        &requested,
        department("shizheng"),
        request(),
        expect![[r#"
        rejected: an extension request is already pending
          ExtensionPending
    "#]],
    );
    check(
        &requested,
        street(),
        Action::DecideExtension {
            approve: true,
            note: String::new(),
        },
        expect![[r#"
        ExtensionApproved { by: Street#5, minutes: 840, resolution_due: 2026-03-17 10:00 }
    "#]],
    );
    // Decided once the resolution deadline has passed, before the shell recorded the miss:
    // the miss is recorded first, as the shell would have, and the pending request lapses
    // with the deadline it asked to move (an approval cannot erase the miss); a request asks
    // for time on the joint resolution deadline the whistle set.
    let resolution_due = IncidentState::from_events(&requested)
        .resolution
        .expect("a resolution deadline")
        .at;
    let approve = || Action::DecideExtension {
        approve: true,
        note: String::new(),
    };
    check_at(
        &requested,
        resolution_due,
        street(),
        approve(),
        expect![[r#"
            rejected: no extension request is pending
              NoExtensionPending
        "#]],
    );
    check_at(
        &Story::acknowledged().events,
        resolution_due,
        department("shizheng"),
        request(),
        expect![[r#"
            DeadlineMissed { handler: Department(shizheng), deadline: Resolution, due: 2026-03-13 10:00 }
            WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Resolution), summoned: [Summoned { department: shizheng, report_by: 2026-03-13 12:00 }], resolution_due: Some(2026-03-18 10:00) }
            ExtensionRequested { by: Department(shizheng)#9, minutes: 840, reason: "需要封路施工" }
        "#]],
    );
    // A minute later, the same.
    let later = Timestamp(resolution_due.0 + MINUTE);
    let kinds = |given: &[IncidentEvent], actor: Actor, action: Action, now: Timestamp| {
        decide(
            &IncidentState::from_events(given),
            IncidentCommand { actor, action },
            now,
            policy(),
        )
        .map(|events| {
            events
                .iter()
                .map(domain::encoding::event_type)
                .collect::<Vec<_>>()
        })
    };
    for (given, actor, action) in [
        (&requested, street(), approve()),
        (
            &Story::acknowledged().events,
            department("shizheng"),
            request(),
        ),
    ] {
        assert_eq!(
            kinds(given, actor, action.clone(), resolution_due),
            kinds(given, actor, action, later)
        );
    }
    check(
        &requested,
        district(),
        Action::DecideExtension {
            approve: false,
            note: "不批".to_owned(),
        },
        expect![[r#"
        ExtensionDenied { by: District#6, note: "不批" }
    "#]],
    );
    check(
        &requested,
        department("shizheng"),
        Action::DecideExtension {
            approve: true,
            note: String::new(),
        },
        expect![[r#"
        rejected: role department:shizheng may not decide_extension
          Forbidden { command: "decide_extension", role: Department(shizheng) }
    "#]],
    );
    let approve = || Action::DecideExtension {
        approve: true,
        note: String::new(),
    };
    let exhausted = Story::acknowledged()
        .then(department("shizheng"), request())
        .then(street(), approve())
        .then(department("shizheng"), request())
        .then(street(), approve())
        .events;
    check(
        &exhausted,
        department("shizheng"),
        request(),
        expect![[r#"
        rejected: 2 extensions were already granted
          ExtensionsExhausted
    "#]],
    );
    // A missed resolution deadline blows a whistle that sets a fresh joint deadline; the
    // handler may ask to extend that one (see the climbing test for a deadline left missed).
    let late = Story::acknowledged()
        .after_minutes(4 * 24 * 60)
        .then(system(), Action::DeadlineElapsed)
        .events;
    check(
        &late,
        department("shizheng"),
        request(),
        expect![[r#"
        ExtensionRequested { by: Department(shizheng)#9, minutes: 840, reason: "需要封路施工" }
    "#]],
    );
}

#[test]
fn park_unpark_merge_cancel() {
    let acknowledged = Story::acknowledged().events;
    check(
        &acknowledged,
        street(),
        Action::Park {
            reason: "纳入老旧小区改造计划".to_owned(),
        },
        expect![[r#"
        Parked { by: Street#5, reason: "纳入老旧小区改造计划" }
    "#]],
    );
    check(
        &acknowledged,
        community(),
        Action::Park {
            reason: "x".to_owned(),
        },
        expect![[r#"
        rejected: role community may not park
          Forbidden { command: "park", role: Community }
    "#]],
    );
    let parked = Story::acknowledged()
        .then(
            street(),
            Action::Park {
                reason: "改造计划".to_owned(),
            },
        )
        .events;
    assert_eq!(next_deadline(&IncidentState::from_events(&parked)), None);
    check(
        &parked,
        district(),
        Action::Unpark,
        expect![[r#"
        Unparked { by: District#6, response_due: 2026-03-10 12:00, resolution_due: 2026-03-13 11:00 }
    "#]],
    );
    check(
        &acknowledged,
        street(),
        Action::Unpark,
        expect![[r#"
        rejected: unpark is not possible while the incident is Acknowledged
          InvalidTransition { command: "unpark", status: Acknowledged }
    "#]],
    );
    let merge = |n: u128| Action::MergeDuplicate {
        duplicate: IncidentId(uuid::Uuid::from_u128(0xD0B)),
        reporter: ActorId(uuid::Uuid::from_u128(n)),
    };
    check(
        &acknowledged,
        system(),
        merge(2),
        expect![[r#"
        DuplicateMerged { by: System#8, duplicate: IncidentId(00000000-0000-0000-0000-000000000d0b), reporter: #2 }
    "#]],
    );
    check(
        &acknowledged,
        system(),
        merge(1),
        expect![[r#"
        rejected: 00000000-0000-0000-0000-000000000001 is already a reporter of this incident
          AlreadyAReporter(#1)
    "#]],
    );
    check(
        &acknowledged,
        system(),
        Action::MergeDuplicate {
            duplicate: incident_id(),
            reporter: ActorId(uuid::Uuid::from_u128(2)),
        },
        expect![[r#"
        rejected: an incident cannot be merged with itself
          SelfMerge
    "#]],
    );
    let mut story = Story::acknowledged();
    for n in 0..16 {
        story = story.then(system(), merge(100 + n));
    }
    check(
        &story.events,
        system(),
        merge(2),
        expect![[r#"
            rejected: more than 16 additional reporters
              TooManyReporters
        "#]],
    );
    // A merged co-reporter may rate.
    let closed_with_neighbour = Story::acknowledged()
        .then(system(), merge(2))
        .then(
            department("shizheng"),
            Action::Resolve {
                note: String::new(),
            },
        )
        .then(
            grid_worker(),
            Action::Verify {
                passed: true,
                note: String::new(),
            },
        )
        .events;
    check(
        &closed_with_neighbour,
        neighbour(),
        Action::Rate {
            satisfaction: Satisfaction::Satisfied,
            reopen: false,
        },
        expect![[r#"
        Rated { by: Resident#2, satisfaction: Satisfied }
    "#]],
    );
    let reported = Story::reported().events;
    check(
        &reported,
        system(),
        Action::MarkDuplicateOf {
            original: IncidentId(uuid::Uuid::from_u128(0x0123)),
        },
        expect![[r#"
        MergedInto { by: System#8, original: IncidentId(00000000-0000-0000-0000-000000000123) }
    "#]],
    );
    check(
        &acknowledged,
        system(),
        Action::MarkDuplicateOf {
            original: IncidentId(uuid::Uuid::from_u128(0x0123)),
        },
        expect![[r#"
        rejected: mark_duplicate_of is not possible while the incident is Acknowledged
          InvalidTransition { command: "mark_duplicate_of", status: Acknowledged }
    "#]],
    );
    check(
        &acknowledged,
        resident(),
        Action::Cancel,
        expect![[r#"
        Cancelled { by: Resident#1 }
    "#]],
    );
    check(
        &acknowledged,
        neighbour(),
        Action::Cancel,
        expect![[r#"
        rejected: only a reporter of this incident may cancel
          NotReporter { command: "cancel" }
    "#]],
    );
    check(
        &Story::resolved().events,
        resident(),
        Action::Cancel,
        expect![[r#"
        rejected: cancel is not possible while the incident is Resolved
          InvalidTransition { command: "cancel", status: Resolved }
    "#]],
    );
    check(
        &acknowledged,
        street(),
        Action::Cancel,
        expect![[r#"
        rejected: role street may not cancel
          Forbidden { command: "cancel", role: Street }
    "#]],
    );
}

#[test]
fn whistle_on_missed_response_then_missed_report_escalates() {
    let dispatched = Story::dispatched("1201").events;
    // Nothing is due yet.
    check_at(
        &dispatched,
        Timestamp(T0.0 + 30 * MINUTE),
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
        rejected: no deadline has passed (next: Some(2026-03-10 11:00))
          NothingDue { next: Some(2026-03-10 11:00) }
    "#]],
    );
    check(
        &dispatched,
        street(),
        Action::DeadlineElapsed,
        expect![[r#"
        rejected: role street may not deadline_elapsed
          Forbidden { command: "deadline_elapsed", role: Street }
    "#]],
    );
    // The response deadline (12:00) passes: recorded against the handler, routine whistle.
    let at_noon = Timestamp(T0.0 + 2 * 60 * MINUTE);
    check_at(
        &dispatched,
        at_noon,
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
        DeadlineMissed { handler: Department(shizheng), deadline: Response, due: 2026-03-10 11:00 }
        WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Response), summoned: [Summoned { department: shizheng, report_by: 2026-03-10 15:30 }], resolution_due: None }
    "#]],
    );
    let whistled = Story::dispatched("1201")
        .after_minutes(120)
        .then(system(), Action::DeadlineElapsed);
    // The same deadline again: nothing (never two escalations for one cause).
    check_at(
        &whistled.events,
        at_noon,
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
        rejected: no deadline has passed (next: Some(2026-03-10 15:30))
          NothingDue { next: Some(2026-03-10 15:30) }
    "#]],
    );
    // The late handler acknowledges: that is its report (报到) to the whistle that summoned
    // it, in the same commit, so it is not recorded as missing its report at 15:30.
    check_at(
        &whistled.events,
        at_noon,
        department("shizheng"),
        Action::Acknowledge,
        expect![[r#"
            Acknowledged { by: Department(shizheng)#9, late: true }
            WhistleReported { by: Department(shizheng)#9, department: shizheng, late: false }
        "#]],
    );
    // Returning the case ("not ours") answers the summons too: the department is not left
    // pending on a whistle about a case it no longer has.
    check_at(
        &whistled.events,
        at_noon,
        department("shizheng"),
        Action::ReturnNotOurs {
            reason: domain::incident::ReturnReason::NotOurDuty,
            note: "供水管网归水务公司".to_owned(),
        },
        expect![[r#"
            Returned { by: Department(shizheng)#9, handler: Department(shizheng), reason: NotOurDuty, note: "供水管网归水务公司", rerouted_to: Street, source: Street, response_due: 2026-03-10 14:30, resolution_due: 2026-03-13 12:00 }
            WhistleReported { by: Department(shizheng)#9, department: shizheng, late: false }
        "#]],
    );
    // ... but does not make it a joint handler that may resolve the case it handed on.
    let returned = whistled.clone().then(
        department("shizheng"),
        Action::ReturnNotOurs {
            reason: domain::incident::ReturnReason::NotOurDuty,
            note: "供水管网归水务公司".to_owned(),
        },
    );
    check_at(
        &returned.events,
        at_noon,
        department("shizheng"),
        Action::Resolve {
            note: "x".to_owned(),
        },
        expect![[r#"
            rejected: department:shizheng may not resolve: the case is neither assigned to it nor summoned it
              NotAssigned { command: "resolve", role: Department(shizheng) }
        "#]],
    );
    // The department reports.
    check_at(
        &whistled.events,
        at_noon,
        department("shizheng"),
        Action::ReportToWhistle,
        expect![[r#"
        WhistleReported { by: Department(shizheng)#9, department: shizheng, late: false }
    "#]],
    );
    check_at(
        &whistled.events,
        at_noon,
        department("jiaojing"),
        Action::ReportToWhistle,
        expect![[r#"
        rejected: department jiaojing was not summoned by the active whistle
          NotSummoned(jiaojing)
    "#]],
    );
    check_at(
        &whistled.events,
        at_noon,
        street(),
        Action::ReportToWhistle,
        expect![[r#"
        rejected: role street may not report_to_whistle
          Forbidden { command: "report_to_whistle", role: Street }
    "#]],
    );
    // It does not report by 15:30: the miss is recorded against it and the whistle goes up.
    let at_four = Timestamp(T0.0 + 6 * 60 * MINUTE);
    check_at(
        &whistled.events,
        at_four,
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
        WhistleReportMissed { department: shizheng, due: 2026-03-10 15:30 }
        WhistleEscalated { kind: Tough, from: Street, to: District, cause: ReportsMissed, summoned: [Summoned { department: shizheng, report_by: 2026-03-10 16:30 }], resolution_due: None }
    "#]],
    );
    let reported = whistled
        .after_minutes(10)
        .then(department("shizheng"), Action::ReportToWhistle)
        .events;
    check(
        &reported,
        department("shizheng"),
        Action::ReportToWhistle,
        expect![[r#"
        rejected: department shizheng has already reported
          AlreadyReportedToWhistle(shizheng)
    "#]],
    );
    check_at(
        &dispatched,
        BEFORE_RESPONSE_DUE,
        department("shizheng"),
        Action::ReportToWhistle,
        expect![[r#"
        rejected: no whistle is active
          NoActiveWhistle
    "#]],
    );
}

#[test]
fn whistle_on_missed_resolution_renews_the_deadline_and_climbs_to_the_top() {
    // Acknowledged, then silent for days: each missed resolution deadline escalates once.
    let mut story = Story::acknowledged();
    let mut rendered = String::new();
    for _ in 0..5 {
        let state = IncidentState::from_events(&story.events);
        let Some(next) = next_deadline(&state) else {
            break;
        };
        story.now = next;
        let before = story.events.len();
        story = story.then(system(), Action::DeadlineElapsed);
        rendered.push_str(&format!("at {}:\n", render(format!("{next:?}"))));
        for e in &story.events[before..] {
            rendered.push_str(&format!("  {}\n", render(format!("{e:?}"))));
        }
    }
    expect![[r#"
        at 2026-03-13 10:00:
          DeadlineMissed { handler: Department(shizheng), deadline: Resolution, due: 2026-03-13 10:00 }
          WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Resolution), summoned: [Summoned { department: shizheng, report_by: 2026-03-13 12:00 }], resolution_due: Some(2026-03-18 10:00) }
        at 2026-03-13 12:00:
          WhistleReportMissed { department: shizheng, due: 2026-03-13 12:00 }
          WhistleEscalated { kind: Tough, from: Street, to: District, cause: ReportsMissed, summoned: [Summoned { department: shizheng, report_by: 2026-03-13 12:30 }], resolution_due: None }
        at 2026-03-13 12:30:
          WhistleReportMissed { department: shizheng, due: 2026-03-13 12:30 }
          WhistleEscalated { kind: Tough, from: District, to: City, cause: ReportsMissed, summoned: [Summoned { department: shizheng, report_by: 2026-03-13 13:00 }], resolution_due: None }
        at 2026-03-13 13:00:
          WhistleReportMissed { department: shizheng, due: 2026-03-13 13:00 }
        at 2026-03-18 10:00:
          DeadlineMissed { handler: Department(shizheng), deadline: Resolution, due: 2026-03-18 10:00 }
    "#]]
    .assert_eq(&rendered);
    let state = IncidentState::from_events(&story.events);
    assert_eq!(
        next_deadline(&state),
        None,
        "at the top of the ladder nothing more falls due"
    );
    assert!(
        state.whistle.is_some(),
        "the late case keeps its active whistle"
    );
    // A summoned department that reported may resolve jointly.
    check(
        &story.events,
        department("shizheng"),
        Action::Resolve {
            note: "联合处置".to_owned(),
        },
        expect![[r#"
        Resolved { by: Department(shizheng)#9, late: true, note: "联合处置" }
    "#]],
    );
    check(
        &story.events,
        department("shizheng"),
        Action::DeclareBeyondPowers {
            reason: "x".to_owned(),
        },
        expect![[r#"
        rejected: the whistle is already at the top of the ladder
          TopOfLadder
    "#]],
    );
    check(
        &story.events,
        department("shizheng"),
        Action::RequestExtension {
            minutes: 60,
            reason: "x".to_owned(),
        },
        expect![[r#"
        rejected: the resolution deadline has already been missed
          ResolutionAlreadyMissed
    "#]],
    );
    check(
        &story.events,
        department("shizheng"),
        Action::ReportToWhistle,
        expect![[r#"
        WhistleReported { by: Department(shizheng)#9, department: shizheng, late: true }
    "#]],
    );
}

#[test]
fn beyond_powers_summons_the_joint_departments() {
    // Illegal building: the urban management bureau cannot act alone.
    let acknowledged = Story::dispatched("0304")
        .then(department("chengguan"), Action::Acknowledge)
        .events;
    let declare = || Action::DeclareBeyondPowers {
        reason: "涉及土地权属".to_owned(),
    };
    check(
        &acknowledged,
        department("chengguan"),
        declare(),
        expect![[r#"
        WhistleBlown { kind: Tough, level: Street, cause: BeyondPowers, summoned: [Summoned { department: ziranziyuan, report_by: 2026-03-10 11:30 }, Summoned { department: zhujian, report_by: 2026-03-10 11:30 }], resolution_due: Some(2026-03-24 11:00) }
    "#]],
    );
    let declared = Story::dispatched("0304")
        .then(department("chengguan"), Action::Acknowledge)
        .then(department("chengguan"), declare())
        .events;
    check(
        &declared,
        department("chengguan"),
        declare(),
        expect![[r#"
        rejected: the handler already declared this assignment beyond its powers
          AlreadyDeclared
    "#]],
    );
    // Resolved jointly, then the grid finds the problem still there: the work starts over,
    // and the handler may declare it beyond its powers again.
    let failed = Story::dispatched("0304")
        .then(department("chengguan"), Action::Acknowledge)
        .then(department("chengguan"), declare())
        .then(
            department("chengguan"),
            Action::Resolve {
                note: "已拆除".to_owned(),
            },
        )
        .then(
            grid_worker(),
            Action::Verify {
                passed: false,
                note: "仍在加盖".to_owned(),
            },
        )
        .events;
    check(
        &failed,
        department("chengguan"),
        declare(),
        expect![[r#"
            WhistleBlown { kind: Tough, level: Street, cause: BeyondPowers, summoned: [Summoned { department: ziranziyuan, report_by: 2026-03-10 11:30 }, Summoned { department: zhujian, report_by: 2026-03-10 11:30 }], resolution_due: Some(2026-03-24 11:00) }
        "#]],
    );
    // A summoned department that has not reported may not act on the case.
    check(
        &declared,
        department("zhujian"),
        Action::Resolve {
            note: String::new(),
        },
        expect![[r#"
        rejected: department:zhujian may not resolve: the case is neither assigned to it nor summoned it
          NotAssigned { command: "resolve", role: Department(zhujian) }
    "#]],
    );
    check(
        &declared,
        department("jiaojing"),
        declare(),
        expect![[r#"
        rejected: department:jiaojing may not declare_beyond_powers: the case is neither assigned to it nor summoned it
          NotAssigned { command: "declare_beyond_powers", role: Department(jiaojing) }
    "#]],
    );
    // A grid worker declares: the community (巷长) whistles for the department (before its
    // response deadline).
    check_at(
        &Story::dispatched("0101").events,
        BEFORE_RESPONSE_DUE,
        grid_worker(),
        declare(),
        expect![[r#"
            WhistleBlown { kind: Tough, level: Community, cause: BeyondPowers, summoned: [Summoned { department: chengguan, report_by: 2026-03-10 11:29 }], resolution_due: Some(2026-03-11 10:59) }
        "#]],
    );
    // With a whistle already active, a declaration escalates it.
    let whistled = Story::dispatched("1201")
        .after_minutes(120)
        .then(system(), Action::DeadlineElapsed)
        .events;
    check_at(
        &whistled,
        Timestamp(T0.0 + 130 * MINUTE),
        department("shizheng"),
        declare(),
        expect![[r#"
        WhistleEscalated { kind: Tough, from: Street, to: District, cause: BeyondPowers, summoned: [Summoned { department: shizheng, report_by: 2026-03-10 12:40 }], resolution_due: Some(2026-03-13 12:00) }
    "#]],
    );
}

#[test]
fn deadline_kinds_are_distinct_causes() {
    // Response and resolution both overdue at once (the shell was down): each is recorded
    // once, the first blows the whistle, the second escalates it.
    let dispatched = Story::dispatched("0101").events;
    let much_later = Timestamp(T0.0 + 3 * 24 * 60 * MINUTE);
    check_at(
        &dispatched,
        much_later,
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
        DeadlineMissed { handler: GridWorker, deadline: Response, due: 2026-03-10 11:00 }
        WhistleBlown { kind: Routine, level: Community, cause: DeadlineMissed(Response), summoned: [Summoned { department: chengguan, report_by: 2026-03-13 12:00 }], resolution_due: None }
        DeadlineMissed { handler: GridWorker, deadline: Resolution, due: 2026-03-11 10:00 }
        WhistleEscalated { kind: Tough, from: Community, to: Street, cause: DeadlineMissed(Resolution), summoned: [Summoned { department: chengguan, report_by: 2026-03-13 10:30 }], resolution_due: Some(2026-03-16 10:00) }
    "#]],
    );
    let _ = DeadlineKind::Response;
}

/// The dispatch service holds 100,000 open incidents at <= 1,024 bytes each: the worst case
/// (every per-incident list at its bound) must fit.
#[test]
fn worst_case_state_fits_the_memory_budget() {
    use domain::incident::{
        CO_REPORTERS_MAX, Level, RETURNS_MAX, Summoned, WHISTLE_SUMMONS_MAX, WhistleCause,
    };
    use domain::routing::WhistleKind;
    let mut state = IncidentState::from_events(&Story::acknowledged().events);
    for n in 0..CO_REPORTERS_MAX {
        state.apply(&IncidentEvent::DuplicateMerged {
            by: system(),
            duplicate: IncidentId(uuid::Uuid::from_u128(n as u128 + 100)),
            reporter: ActorId(uuid::Uuid::from_u128(n as u128 + 100)),
        });
    }
    for n in 0..RETURNS_MAX {
        let name = format!("department_{n}");
        state.apply(&IncidentEvent::Returned {
            by: department(&name),
            handler: Handler::Department(dept(&name)),
            reason: ReturnReason::NotOurDuty,
            note: String::new(),
            rerouted_to: Handler::Street,
            source: domain::incident::RouteSource::Street,
            response_due: NOW,
            resolution_due: NOW,
        });
    }
    let summon = |from: usize, to: usize| -> Vec<Summoned> {
        (from..to)
            .map(|n| Summoned {
                department: dept(&format!("summoned_{n}")),
                report_by: NOW,
            })
            .collect()
    };
    state.apply(&IncidentEvent::WhistleBlown {
        kind: WhistleKind::Tough,
        level: Level::Street,
        cause: WhistleCause::BeyondPowers,
        summoned: summon(0, 8),
        resolution_due: None,
    });
    for n in 0..8 {
        state.apply(&IncidentEvent::WhistleReported {
            by: system(),
            department: dept(&format!("summoned_{n}")),
            late: false,
        });
    }
    state.apply(&IncidentEvent::WhistleEscalated {
        kind: WhistleKind::Tough,
        from: Level::Street,
        to: Level::District,
        cause: WhistleCause::ReportsMissed,
        summoned: summon(8, 16),
        resolution_due: None,
    });
    let summons = state.whistle.as_ref().map_or(0, |w| w.summons.len());
    assert_eq!(summons, WHISTLE_SUMMONS_MAX);
    let bytes = std::mem::size_of::<IncidentState>() + state.heap_bytes();
    expect!["216 bytes inline + 708 on the heap = 924 bytes"].assert_eq(&format!(
        "{} bytes inline + {} on the heap = {bytes} bytes",
        std::mem::size_of::<IncidentState>(),
        state.heap_bytes()
    ));
    assert!(bytes <= 1_024);
}

/// A case filed under a category that a later configuration no longer routes (the events are
/// facts; the policy changed under them) is refused with a typed error, not a panic.
#[test]
fn a_category_the_policy_no_longer_routes() {
    let mut given = Story::reported().events;
    given.push(IncidentEvent::Filed {
        by: system(),
        grid: grid(),
        category: category("0199"),
        emergency: false,
    });
    check(
        &given,
        system(),
        Action::Dispatch { to: None },
        expect![[r#"
            rejected: category 0199 has no route for street 350404002
              NoRoute { category: CategoryCode { class: 1, subclass: 99 }, street: StreetCode(350404002) }
        "#]],
    );
}

/// A command that replaces or clears the deadlines (returning, reassigning, parking,
/// declaring, cancelling) first records the deadlines already past at its time, as the
/// shell's `DeadlineElapsed` would have: a miss the shell had not yet recorded is not erased,
/// and the log does not depend on which of the two the shell decided first.
#[test]
fn misses_past_at_the_command_are_recorded_first() {
    // Dispatched to shizheng at 10:00, response due 11:00; the shell has recorded nothing.
    let dispatched = Story::dispatched("1201");
    let late = Timestamp(NOW.0 + 5 * MINUTE);
    check_at(
        &dispatched.events,
        late,
        department("shizheng"),
        Action::ReturnNotOurs {
            reason: ReturnReason::NotOurDuty,
            note: "不归我们管".to_owned(),
        },
        expect![[r#"
            DeadlineMissed { handler: Department(shizheng), deadline: Response, due: 2026-03-10 11:00 }
            WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Response), summoned: [Summoned { department: shizheng, report_by: 2026-03-10 14:35 }], resolution_due: None }
            Returned { by: Department(shizheng)#9, handler: Department(shizheng), reason: NotOurDuty, note: "不归我们管", rerouted_to: Street, source: Street, response_due: 2026-03-10 13:35, resolution_due: 2026-03-13 11:05 }
            WhistleReported { by: Department(shizheng)#9, department: shizheng, late: false }
        "#]],
    );
    // The same log as the shell deciding `DeadlineElapsed` first, then the command.
    let timer_first = dispatched
        .clone()
        .after_minutes(65)
        .then(system(), Action::DeadlineElapsed)
        .then(
            department("shizheng"),
            Action::ReturnNotOurs {
                reason: ReturnReason::NotOurDuty,
                note: "不归我们管".to_owned(),
            },
        );
    let command_only = dispatched.clone().after_minutes(65).then(
        department("shizheng"),
        Action::ReturnNotOurs {
            reason: ReturnReason::NotOurDuty,
            note: "不归我们管".to_owned(),
        },
    );
    assert_eq!(timer_first.events, command_only.events);
    for (actor, action) in [
        (
            street(),
            Action::Dispatch {
                to: Some(Handler::Department(dept("jiaojing"))),
            },
        ),
        (
            street(),
            Action::Park {
                reason: "等待上级批复".to_owned(),
            },
        ),
        (resident(), Action::Cancel),
    ] {
        let name = action.name();
        let events = decide(
            &IncidentState::from_events(&dispatched.events),
            IncidentCommand {
                actor,
                action: action.clone(),
            },
            late,
            policy(),
        )
        .unwrap_or_else(|e| panic!("{name} refused: {e}"));
        assert!(
            matches!(
                events[0],
                IncidentEvent::DeadlineMissed {
                    deadline: DeadlineKind::Response,
                    ..
                }
            ),
            "{name} began with {:?}",
            events[0]
        );
        assert!(action.opens(&events), "{name} does not open its own commit");
    }
    // At the deadline's own millisecond it is past, as for `DeadlineElapsed`.
    check_at(
        &dispatched.events,
        NOW,
        street(),
        Action::Park {
            reason: "等待上级批复".to_owned(),
        },
        expect![[r#"
            DeadlineMissed { handler: Department(shizheng), deadline: Response, due: 2026-03-10 11:00 }
            WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Response), summoned: [Summoned { department: shizheng, report_by: 2026-03-10 14:30 }], resolution_due: None }
            Parked { by: Street#5, reason: "等待上级批复" }
        "#]],
    );
    // Acknowledging keeps the deadline: its own `late` flag records the lateness, and the
    // commit is the acknowledgement alone.
    check_at(
        &dispatched.events,
        late,
        department("shizheng"),
        Action::Acknowledge,
        expect![[r#"
            DeadlineMissed { handler: Department(shizheng), deadline: Response, due: 2026-03-10 11:00 }
            WhistleBlown { kind: Routine, level: Street, cause: DeadlineMissed(Response), summoned: [Summoned { department: shizheng, report_by: 2026-03-10 14:35 }], resolution_due: None }
            Acknowledged { by: Department(shizheng)#9, late: true }
            WhistleReported { by: Department(shizheng)#9, department: shizheng, late: false }
        "#]],
    );
    // Nothing past: the command alone.
    check_at(
        &dispatched.events,
        BEFORE_RESPONSE_DUE,
        street(),
        Action::Park {
            reason: "等待上级批复".to_owned(),
        },
        expect![[r#"
            Parked { by: Street#5, reason: "等待上级批复" }
        "#]],
    );
    // A resent command is told from another by the event after the recorded misses.
    let returned = Action::ReturnNotOurs {
        reason: ReturnReason::NotOurDuty,
        note: "不归我们管".to_owned(),
    };
    assert!(returned.opens(&command_only.events[dispatched.events.len()..]));
    assert!(
        !Action::Park {
            reason: String::new()
        }
        .opens(&command_only.events[dispatched.events.len()..])
    );
    assert!(!Action::DeadlineElapsed.opens(&command_only.events[dispatched.events.len() + 2..]));
}

/// An office that reassigns a case away from a department the active whistle summoned, before
/// it reported, withdraws that summons in the same commit: the department is not recorded as
/// missing a report, nor the whistle escalated, over a case it no longer holds.
#[test]
fn reassignment_withdraws_the_outgoing_departments_summons() {
    // Dispatched to shizheng at 10:00; its response deadline (11:00) is missed and the street
    // whistles for it (report by 14:30).
    let whistled = Story::dispatched("1201")
        .after_minutes(60)
        .then(system(), Action::DeadlineElapsed);
    let reassign = || Action::Dispatch {
        to: Some(Handler::Department(dept("jiaojing"))),
    };
    let at = Timestamp(NOW.0 + 10 * MINUTE);
    check_at(
        &whistled.events,
        at,
        street(),
        reassign(),
        expect![[r#"
        Dispatched { by: Street#5, handler: Department(jiaojing), source: Manual, clock: Working, response_due: 2026-03-10 13:40, resolution_due: 2026-03-13 11:10 }
        WhistleSummonsWithdrawn { by: Street#5, department: shizheng }
    "#]],
    );
    // Its report time passes: nothing is due for shizheng; jiaojing's own response deadline
    // is the next one.
    let reassigned = whistled
        .clone()
        .after_minutes(10)
        .then(street(), reassign());
    let state = IncidentState::from_events(&reassigned.events);
    check_at(
        &reassigned.events,
        Timestamp(T0.0 + 6 * 60 * MINUTE),
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
            DeadlineMissed { handler: Department(jiaojing), deadline: Response, due: 2026-03-10 13:40 }
            WhistleEscalated { kind: Tough, from: Street, to: District, cause: DeadlineMissed(Response), summoned: [Summoned { department: jiaojing, report_by: 2026-03-10 16:30 }], resolution_due: None }
        "#]],
    );
    let summoned: Vec<_> = state
        .whistle
        .iter()
        .flat_map(|w| w.summons.iter().map(|s| s.department))
        .collect();
    assert!(
        state.whistle.is_some() && summoned.is_empty(),
        "{summoned:?}"
    );
    // A summons it already answered stays on the record.
    let reported = whistled
        .clone()
        .after_minutes(5)
        .then(department("shizheng"), Action::ReportToWhistle)
        .after_minutes(5);
    check_at(
        &reported.events,
        at,
        street(),
        reassign(),
        expect![[r#"
        Dispatched { by: Street#5, handler: Department(jiaojing), source: Manual, clock: Working, response_due: 2026-03-10 13:40, resolution_due: 2026-03-13 11:10 }
    "#]],
    );
    // After the withdrawal the department cannot report to the whistle for the case.
    check_at(
        &reassigned.events,
        Timestamp(at.0 + MINUTE),
        department("shizheng"),
        Action::ReportToWhistle,
        expect![[r#"
            rejected: department shizheng was not summoned by the active whistle
              NotSummoned(shizheng)
        "#]],
    );
}

/// Once the whistle has climbed above the street, parking the case, reassigning it and
/// deciding an extension are for the whistle's level or above.
#[test]
fn an_office_decides_at_the_whistles_level_or_above() {
    // shizheng misses its response (11:00): the street whistles (report by 14:30); it does not
    // report, and the whistle climbs to the district. Then it acknowledges (reporting in) and
    // asks for more time.
    let at_district = Story::dispatched("1201")
        .after_minutes(60)
        .then(system(), Action::DeadlineElapsed)
        .after_minutes(210)
        .then(system(), Action::DeadlineElapsed)
        .after_minutes(10)
        .then(department("shizheng"), Action::Acknowledge)
        .then(
            department("shizheng"),
            Action::RequestExtension {
                minutes: 60,
                reason: "需要封路".to_owned(),
            },
        );
    let state = IncidentState::from_events(&at_district.events);
    assert_eq!(
        state.whistle.as_ref().map(|w| w.level),
        Some(domain::incident::Level::District)
    );
    let at = Timestamp(at_district.now.0 + 10 * MINUTE);
    let park = || Action::Park {
        reason: "纳入改造计划".to_owned(),
    };
    let reassign = || Action::Dispatch {
        to: Some(Handler::Department(dept("jiaojing"))),
    };
    let decide_extension = || Action::DecideExtension {
        approve: true,
        note: String::new(),
    };
    for action in [park(), reassign(), decide_extension()] {
        let refused = decide(
            &state,
            IncidentCommand {
                actor: street(),
                action: action.clone(),
            },
            at,
            policy(),
        );
        assert!(
            matches!(
                refused,
                Err(domain::Rejection::BelowWhistleLevel {
                    role: Role::Street,
                    level: domain::incident::Level::District,
                    ..
                })
            ),
            "{action:?}: {refused:?}"
        );
    }
    check_at(
        &at_district.events,
        at,
        street(),
        park(),
        expect![[r#"
        rejected: street may not park: the active whistle is at the District level, above it
          BelowWhistleLevel { command: "park", role: Street, level: District }
    "#]],
    );
    check_at(
        &at_district.events,
        at,
        district(),
        park(),
        expect![[r#"
            Parked { by: District#6, reason: "纳入改造计划" }
        "#]],
    );
    check_at(
        &at_district.events,
        at,
        district(),
        decide_extension(),
        expect![[r#"
            ExtensionApproved { by: District#6, minutes: 60, resolution_due: 2026-03-13 11:00 }
        "#]],
    );
    check_at(
        &at_district.events,
        at,
        actor(Role::City, 7),
        reassign(),
        expect![[r#"
            Dispatched { by: City#7, handler: Department(jiaojing), source: Manual, clock: Working, response_due: 2026-03-10 15:50, resolution_due: 2026-03-13 14:50 }
        "#]],
    );
}

/// Verification (核查) is a check on the handler's work by someone else: a case its grid
/// worker resolved is verified by the community (or another grid worker), not by itself.
#[test]
fn no_one_verifies_their_own_work() {
    // Street litter (0101) goes to the grid worker.
    let resolved = Story::dispatched("0101")
        .then(grid_worker(), Action::Acknowledge)
        .then(
            grid_worker(),
            Action::Resolve {
                note: "已清理".to_owned(),
            },
        );
    let verify = || Action::Verify {
        passed: true,
        note: String::new(),
    };
    check(
        &resolved.events,
        grid_worker(),
        verify(),
        expect![[r#"
        rejected: the one who resolved the case may not verify it
          OwnWork { command: "verify" }
    "#]],
    );
    check(
        &resolved.events,
        community(),
        verify(),
        expect![[r#"
        Verified { by: Community#4 }
        Closed { by: Community#4 }
    "#]],
    );
    check(
        &resolved.events,
        actor(Role::GridWorker, 33),
        verify(),
        expect![[r#"
            Verified { by: GridWorker#33 }
            Closed { by: GridWorker#33 }
        "#]],
    );
    // A department's work is verified by the grid worker, as before.
    check(
        &Story::resolved().events,
        grid_worker(),
        verify(),
        expect![[r#"
            Verified { by: GridWorker#3 }
            Closed { by: GridWorker#3 }
        "#]],
    );
}

/// A report and a response falling due at the same instant are both recorded missed: the
/// report first, since the escalation for the response re-summons the handler department and
/// would otherwise replace its summons before the miss was recorded.
#[test]
fn a_report_due_with_a_response_is_recorded_first() {
    // A burst water main (0401, an emergency): dispatched to shizheng at 10:00 and the
    // emergency whistle summons shizheng, yingji and jiaojing; shizheng's response and every
    // report fall due at 10:30, and nobody acts.
    let dispatched = Story::dispatched("0401");
    let due = IncidentState::from_events(&dispatched.events)
        .response
        .expect("a response deadline")
        .at;
    check_at(
        &dispatched.events,
        due,
        system(),
        Action::DeadlineElapsed,
        expect![[r#"
            WhistleReportMissed { department: shizheng, due: 2026-03-10 10:30 }
            WhistleReportMissed { department: yingji, due: 2026-03-10 10:30 }
            WhistleReportMissed { department: jiaojing, due: 2026-03-10 10:30 }
            WhistleEscalated { kind: Emergency, from: Street, to: District, cause: ReportsMissed, summoned: [Summoned { department: shizheng, report_by: 2026-03-10 11:00 }, Summoned { department: yingji, report_by: 2026-03-10 11:00 }, Summoned { department: jiaojing, report_by: 2026-03-10 11:00 }], resolution_due: None }
            DeadlineMissed { handler: Department(shizheng), deadline: Response, due: 2026-03-10 10:30 }
            WhistleEscalated { kind: Emergency, from: District, to: City, cause: DeadlineMissed(Response), summoned: [Summoned { department: shizheng, report_by: 2026-03-10 11:00 }], resolution_due: None }
        "#]],
    );
}
