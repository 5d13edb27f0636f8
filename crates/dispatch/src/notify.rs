//! Durable notifications to the people who must act: one JetStream subject per recipient in
//! the NOTIFICATIONS stream, so a console that was offline reads what it missed from its own
//! durable consumer.
//!
//! Subjects: `dispatch.notify.department.<id>`, `dispatch.notify.city.<4 digits>`,
//! `dispatch.notify.district.<6 digits>`, `dispatch.notify.street.<9 digits>`,
//! `dispatch.notify.community.<12 digits>`, `dispatch.notify.grid.<15 digits>`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use domain::incident::{Handler, IncidentEvent, IncidentState, Level};
use domain::{DepartmentId, GridCode, IncidentId, Role, Timestamp};
use serde::{Deserialize, Serialize};

pub const NOTIFICATIONS_STREAM: &str = "NOTIFICATIONS";
pub const NOTIFY_SUBJECT_PREFIX: &str = "dispatch.notify";
/// How long a console may stay offline and still catch up.
pub const NOTIFICATIONS_AGE_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most notifications one commit produces (a whistle summons at most a dozen departments).
pub const NOTIFICATIONS_PER_COMMIT_MAX: usize = 32;

/// Who is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Recipient {
    Department(DepartmentId),
    /// A city office (4-digit GB/T 2260 code), for whistles that reached the city.
    City(u32),
    /// A district office (6-digit GB/T 2260 code), for whistles that reached the district.
    District(u32),
    Street(domain::StreetCode),
    Community(u64),
    Grid(GridCode),
}

impl Recipient {
    pub fn subject(&self) -> String {
        match self {
            Recipient::Department(d) => format!("{NOTIFY_SUBJECT_PREFIX}.department.{d}"),
            Recipient::City(c) => format!("{NOTIFY_SUBJECT_PREFIX}.city.{c:04}"),
            Recipient::District(d) => format!("{NOTIFY_SUBJECT_PREFIX}.district.{d:06}"),
            Recipient::Street(s) => format!("{NOTIFY_SUBJECT_PREFIX}.street.{s}"),
            Recipient::Community(c) => format!("{NOTIFY_SUBJECT_PREFIX}.community.{c:012}"),
            Recipient::Grid(g) => format!("{NOTIFY_SUBJECT_PREFIX}.grid.{g}"),
        }
    }

    /// The office at `level` of the whistle ladder for a case in `grid`.
    pub fn for_level(level: Level, grid: GridCode) -> Recipient {
        match level {
            Level::Grid => Recipient::Grid(grid),
            Level::Community => Recipient::Community(grid.community()),
            Level::Street => Recipient::Street(grid.street()),
            Level::District => Recipient::District(grid.district()),
            Level::City => Recipient::City(grid.city()),
        }
    }

    /// The recipient speaking for a handler of a case in `grid`.
    pub fn for_handler(handler: Handler, grid: Option<GridCode>) -> Option<Recipient> {
        match handler {
            Handler::Department(d) => Some(Recipient::Department(d)),
            Handler::Street => grid.map(|g| Recipient::Street(g.street())),
            Handler::Community => grid.map(|g| Recipient::Community(g.community())),
            Handler::GridWorker => grid.map(Recipient::Grid),
        }
    }
}

/// One notification (JSON body), on `dispatch.notify.<recipient>` in the NOTIFICATIONS stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Notification {
    pub incident: uuid::Uuid,
    /// `assigned`, `summoned`, `deadline_missed`, `report_missed`, `summons_withdrawn` (the
    /// case was reassigned away from a summoned department before it reported),
    /// `whistle` (to the office at the level a whistle was blown or escalated to: community,
    /// street, district or city), `extension_requested` (to the office that decides it: the
    /// street, or the whistle's level when above), `extension_decided`,
    /// `verification_failed`, `to_verify`.
    pub kind: String,
    pub recipient: String,
    /// INCIDENTS stream sequence of the commit that caused it.
    pub stream_sequence: u64,
    pub version: u64,
    /// The deadline that matters to the recipient (respond, report or resolve by), if any,
    /// Unix milliseconds.
    #[schemars(with = "Option<i64>")]
    pub due: Option<Timestamp>,
}

/// Whether a commit's events include a notice addressed from the incident as the commit found
/// it (to whoever handles the case: an extension decided, a verification failed, a reopening
/// or unparking; to the office at the whistle's level: an extension requested): its
/// recipient comes from the state, not from the events themselves, so it must be the state
/// as of the commit, not a later one.
pub fn addressed_to_current_handler<'a>(
    events: impl IntoIterator<Item = &'a IncidentEvent>,
) -> bool {
    events.into_iter().any(|event| {
        matches!(
            event,
            IncidentEvent::Reopened { .. }
                | IncidentEvent::Unparked { .. }
                | IncidentEvent::ExtensionApproved { .. }
                | IncidentEvent::ExtensionDenied { .. }
                | IncidentEvent::VerificationFailed { .. }
                | IncidentEvent::ExtensionRequested { .. }
        )
    })
}

/// The notifications a commit causes. `state` is the incident's state just before the commit
/// or just after it (for the grid and the handler the commit's notices go to; see
/// [`addressed_to_current_handler`]), never a later one.
pub fn notifications(
    incident: IncidentId,
    events: &[&IncidentEvent],
    state: Option<&IncidentState>,
    stream_sequence: u64,
    version: u64,
) -> Vec<(Recipient, Notification)> {
    // The grid never changes once filed; a commit that files the incident names it itself, so
    // a commit the book has not folded yet (a filing dispatched by intake in the same commit)
    // is addressed without the held state.
    let grid = events
        .iter()
        .find_map(|event| match event {
            IncidentEvent::Filed { grid, .. } => Some(*grid),
            _ => None,
        })
        .or_else(|| state.and_then(|s| s.grid));
    // The incident as the commit goes: who handles it, the whistle's level (an office decides
    // an extension at it or above) and the resolution deadline. Folding the commit onto the
    // state after it again leaves those as they are: each event sets them outright.
    let mut scratch = state.cloned().unwrap_or_default();
    // Whoever handles the case, for the notices the events do not address themselves.
    let handling =
        |state: &IncidentState| state.handler.and_then(|h| Recipient::for_handler(h, grid));
    let mut out: Vec<(Recipient, Notification)> = Vec::new();
    let mut push = |recipient: Option<Recipient>, kind: &str, due: Option<Timestamp>| {
        if let Some(recipient) = recipient
            && out.len() < NOTIFICATIONS_PER_COMMIT_MAX
            && !out.iter().any(|(r, n)| *r == recipient && n.kind == kind)
        {
            out.push((
                recipient,
                Notification {
                    incident: incident.0,
                    kind: kind.to_owned(),
                    recipient: recipient.subject(),
                    stream_sequence,
                    version,
                    due,
                },
            ));
        }
    };
    // A summons answered or ended within the same commit is not announced: a command that
    // records a miss first (`Action::records_misses_first`) may blow a whistle and, in the same
    // commit, report to it (an acknowledgement), withdraw it (a reassignment) or clear it
    // (parking, cancelling, resolving).
    let ends_whistle = |event: &IncidentEvent| {
        matches!(
            event,
            IncidentEvent::Parked { .. }
                | IncidentEvent::Cancelled { .. }
                | IncidentEvent::Resolved { .. }
        )
    };
    let answered_later = |at: usize, department: DepartmentId| {
        events[at + 1..].iter().any(|later| match later {
            IncidentEvent::WhistleReported { department: d, .. }
            | IncidentEvent::WhistleSummonsWithdrawn { department: d, .. } => *d == department,
            other => ends_whistle(other),
        })
    };
    // Only the last whistle of a commit is announced to an office (a late declaration may blow
    // a whistle for the miss it records first and escalate it in the same commit), and none
    // that the commit ends.
    let whistle_superseded_later = |at: usize| {
        events[at + 1..].iter().any(|later| {
            ends_whistle(later)
                || matches!(
                    later,
                    IncidentEvent::WhistleBlown { .. } | IncidentEvent::WhistleEscalated { .. }
                )
        })
    };
    let summoned_before = |at: usize, department: DepartmentId| {
        events[..at].iter().any(|earlier| match earlier {
            IncidentEvent::WhistleBlown { summoned, .. }
            | IncidentEvent::WhistleEscalated { summoned, .. } => {
                summoned.iter().any(|s| s.department == department)
            }
            _ => false,
        })
    };
    for (at, event) in events.iter().enumerate() {
        use IncidentEvent as E;
        match event {
            E::Dispatched {
                handler,
                response_due,
                ..
            }
            | E::Returned {
                rerouted_to: handler,
                response_due,
                ..
            } => {
                push(
                    Recipient::for_handler(*handler, grid),
                    "assigned",
                    Some(*response_due),
                );
            }
            E::Reopened { response_due, .. } | E::Unparked { response_due, .. } => {
                push(handling(&scratch), "assigned", Some(*response_due))
            }
            E::WhistleBlown {
                summoned, level, ..
            }
            | E::WhistleEscalated {
                summoned,
                to: level,
                ..
            } => {
                if !whistle_superseded_later(at) {
                    push(
                        grid.map(|grid| Recipient::for_level(*level, grid)),
                        "whistle",
                        None,
                    );
                }
                for s in summoned
                    .iter()
                    .filter(|s| !answered_later(at, s.department))
                {
                    push(
                        Some(Recipient::Department(s.department)),
                        "summoned",
                        Some(s.report_by),
                    );
                }
            }
            E::DeadlineMissed { handler, .. } => push(
                Recipient::for_handler(*handler, grid),
                "deadline_missed",
                None,
            ),
            E::WhistleReportMissed { department, .. } => push(
                Some(Recipient::Department(*department)),
                "report_missed",
                None,
            ),
            E::WhistleSummonsWithdrawn { department, .. } if !summoned_before(at, *department) => {
                push(
                    Some(Recipient::Department(*department)),
                    "summons_withdrawn",
                    None,
                )
            }
            E::ExtensionRequested { .. } => {
                // Decided by the street, or by the office at the whistle's level when the
                // whistle has climbed above it (`below_whistle_level`).
                let office = scratch
                    .whistle
                    .as_ref()
                    .map_or(Level::Street, |whistle| whistle.level.max(Level::Street));
                push(
                    grid.map(|grid| Recipient::for_level(office, grid)),
                    "extension_requested",
                    scratch.resolution.map(|due| due.at),
                );
            }
            E::ExtensionApproved { resolution_due, .. } => push(
                handling(&scratch),
                "extension_decided",
                Some(*resolution_due),
            ),
            E::ExtensionDenied { .. } => push(handling(&scratch), "extension_decided", None),
            E::VerificationFailed { resolution_due, .. } => push(
                handling(&scratch),
                "verification_failed",
                Some(*resolution_due),
            ),
            // The grid verifies the handler's work (核查); work its own grid worker did goes
            // to the community (巷长), since no one verifies their own.
            E::Resolved { by, .. } => push(
                grid.map(|grid| match by.role {
                    Role::GridWorker => Recipient::Community(grid.community()),
                    _ => Recipient::Grid(grid),
                }),
                "to_verify",
                None,
            ),
            _ => {}
        }
        scratch.apply(event);
    }
    out
}

/// Commits remembered by [`NotifiedHere`]. The notifier lags the appends by its backlog; a
/// commit forgotten before the notifier reaches it is published again, and the server drops
/// the repeat by Msg-Id (within the stream's duplicate window).
pub const NOTIFIED_HERE_MAX: usize = 65_536;

/// The INCIDENTS stream sequences of commits whose notifications this instance stored right
/// after it appended them, so that the shared notifier acknowledges those commits without
/// publishing again. Holds at most [`NOTIFIED_HERE_MAX`]; the oldest is forgotten first.
#[derive(Debug, Default)]
pub struct NotifiedHere {
    /// Insertion order (sequence, insertion number), for forgetting the oldest; may still
    /// hold entries taken since, which [`Self::sequences`] no longer names with that number.
    order: VecDeque<(u64, u64)>,
    /// Sequence → its insertion number.
    sequences: HashMap<u64, u64>,
    inserted: u64,
}

impl NotifiedHere {
    pub fn insert(&mut self, sequence: u64) {
        if self.sequences.contains_key(&sequence) {
            return;
        }
        self.inserted += 1;
        self.sequences.insert(sequence, self.inserted);
        self.order.push_back((sequence, self.inserted));
        if self.order.len() > NOTIFIED_HERE_MAX
            && let Some((oldest, number)) = self.order.pop_front()
            && self.sequences.get(&oldest) == Some(&number)
        {
            self.sequences.remove(&oldest);
        }
        debug_assert!(self.sequences.len() <= self.order.len());
        debug_assert!(self.order.len() <= NOTIFIED_HERE_MAX);
    }

    /// Whether the commit at `sequence` was notified here (without taking it).
    pub fn contains(&self, sequence: u64) -> bool {
        self.sequences.contains_key(&sequence)
    }

    /// True (once) when the commit at `sequence` was notified here.
    pub fn take(&mut self, sequence: u64) -> bool {
        self.sequences.remove(&sequence).is_some()
    }
}

/// Creates the NOTIFICATIONS stream, or opens it as it is (`wangge up` applies the replicas
/// and the duplicate window to an existing one).
pub async fn open_stream(
    jetstream: &jetstream::Context,
    replicas: usize,
    duplicate_window: Duration,
) -> Result<stream::Stream, String> {
    jetstream
        .get_or_create_stream(stream::Config {
            name: NOTIFICATIONS_STREAM.to_owned(),
            subjects: vec![format!("{NOTIFY_SUBJECT_PREFIX}.>")],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: replicas,
            duplicate_window,
            max_age: NOTIFICATIONS_AGE_MAX,
            description: Some("wangge dispatch notifications to consoles".to_owned()),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create or open stream {NOTIFICATIONS_STREAM}: {e}"))
}

/// A console's durable consumer on its own notification subject: the server keeps its
/// position, so a console that was offline reads everything it missed, in order. An existing
/// consumer of that name with another filter is refused, not read.
pub async fn console_consumer(
    jetstream: &jetstream::Context,
    recipient: Recipient,
    durable: &str,
) -> Result<consumer::PullConsumer, String> {
    let stream = jetstream
        .get_stream(NOTIFICATIONS_STREAM)
        .await
        .map_err(|e| format!("open stream {NOTIFICATIONS_STREAM}: {e}"))?;
    let filter = recipient.subject();
    let consumer = stream
        .get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: filter.clone(),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("console consumer {durable}: {e}"))?;
    // An existing consumer is returned as it is: one another console created under this name,
    // or redirected, with another filter would silently deliver someone else's notices.
    let found = consumer.cached_info().config.filter_subject.clone();
    if found != filter {
        return Err(format!(
            "console consumer {durable} reads {found:?}, not {filter:?}: another console holds \
             this name; pick another or have an operator delete it"
        ));
    }
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filing dispatched in its own commit (intake routes at filing) may reach the notifier
    /// before the book has folded it: the commit names its grid, so the grid worker is still
    /// told, with the deadline the commit set.
    #[test]
    fn a_filing_dispatched_in_its_commit_is_addressed_without_the_held_state() {
        use domain::incident::{Action, IncidentCommand};
        use domain::{Actor, ActorId, Policy, Role, decide};
        let policy = Policy::embedded("sanming").expect("embedded policy");
        let incident = IncidentId(uuid::Uuid::from_u128(7));
        let now = Timestamp(1_795_000_000_000);
        let actor = |role, n| Actor {
            role,
            id: ActorId(uuid::Uuid::from_u128(n)),
        };
        let mut state = IncidentState::default();
        let mut events = Vec::new();
        for (by, action) in [
            (
                actor(Role::Resident, 1),
                Action::Report {
                    incident,
                    description: "standing water".to_owned(),
                    position: None,
                    category_hint: None,
                },
            ),
            (
                actor(Role::System, 2),
                Action::File {
                    grid: "350402001001003".parse().expect("grid code"),
                    category: "0103".parse().expect("category"),
                },
            ),
            (actor(Role::System, 2), Action::Dispatch { to: None }),
        ] {
            for event in decide(&state, IncidentCommand { actor: by, action }, now, &policy)
                .expect("decided")
            {
                state.apply(&event);
                events.push(event);
            }
        }
        let commit: Vec<&IncidentEvent> = events.iter().collect();
        let without_state = notifications(incident, &commit, None, 41, 3);
        let with_state = notifications(incident, &commit, Some(&state), 41, 3);
        assert_eq!(without_state.len(), 1, "{without_state:?}");
        let (recipient, note) = &without_state[0];
        assert_eq!(
            recipient.subject(),
            format!("{NOTIFY_SUBJECT_PREFIX}.grid.350402001001003")
        );
        assert_eq!(note.kind, "assigned");
        assert_eq!(note.due, state.response.map(|due| due.at));
        assert_eq!(without_state, with_state);
    }

    /// Notices of commands decided on a deadline the shell had not recorded yet (so their
    /// commit records the miss first), of reassignment, and of verification: each line is
    /// `kind -> recipient`.
    #[test]
    fn a_summons_answered_or_ended_in_its_own_commit_is_not_announced() {
        use domain::incident::{Action, Handler, IncidentCommand};
        use domain::{Actor, ActorId, Policy, decide};
        use expect_test::{Expect, expect};
        let policy = Policy::embedded("sanming").expect("embedded policy");
        let incident = IncidentId(uuid::Uuid::from_u128(7));
        let t0 = Timestamp(1_773_108_000_000); // Tuesday 2026-03-10 10:00 in Sanming
        let minutes = |n: i64| Timestamp(t0.0 + n * 60_000);
        let actor = |role, n| Actor {
            role,
            id: ActorId(uuid::Uuid::from_u128(n)),
        };
        let shizheng = actor(Role::Department("shizheng".parse().expect("id")), 3);
        let street = actor(Role::Street, 4);
        let system = actor(Role::System, 2);
        let run = |history: &[(Timestamp, Actor, Action)]| {
            let mut state = IncidentState::default();
            let mut last = Vec::new();
            for (now, by, action) in history.iter().cloned() {
                last = decide(&state, IncidentCommand { actor: by, action }, now, &policy)
                    .expect("decided");
                last.iter().for_each(|event| state.apply(event));
            }
            (state, last)
        };
        let check = |commands: &[(Timestamp, Actor, Action)], expect: Expect| {
            let (before, _) = run(&commands[..commands.len() - 1]);
            let (_, last) = run(commands);
            let commit: Vec<&IncidentEvent> = last.iter().collect();
            let mut text: String = last
                .iter()
                .map(|e| format!("{}\n", domain::encoding::event_type(e)))
                .collect();
            for (recipient, notice) in notifications(incident, &commit, Some(&before), 9, 9) {
                let due = notice
                    .due
                    .map(|due| format!(" due {due}"))
                    .unwrap_or_default();
                text.push_str(&format!(
                    "  {} -> {}{due}\n",
                    notice.kind,
                    recipient.subject()
                ));
            }
            expect.assert_eq(&text);
        };
        let filed = |category: &str| {
            vec![
                (
                    t0,
                    actor(Role::Resident, 1),
                    Action::Report {
                        incident,
                        description: "路面有个大坑".to_owned(),
                        position: None,
                        category_hint: None,
                    },
                ),
                (
                    t0,
                    system,
                    Action::File {
                        grid: "350404002001001".parse().expect("grid code"),
                        category: category.parse().expect("category"),
                    },
                ),
                (t0, system, Action::Dispatch { to: None }),
            ]
        };
        let with = |mut history: Vec<(Timestamp, Actor, Action)>, now, by, action| {
            history.push((now, by, action));
            history
        };
        let reassign = || Action::Dispatch {
            to: Some(Handler::Department("jiaojing".parse().expect("id"))),
        };
        // The response (due 11:00) acknowledged at 13:00: the miss is recorded, and the whistle
        // it blows is reported to in the same commit: no summons to announce.
        check(
            &with(filed("1201"), minutes(180), shizheng, Action::Acknowledge),
            expect![[r#"
                incident.deadline_missed
                incident.whistle_blown
                incident.acknowledged
                incident.whistle_reported
                  deadline_missed -> dispatch.notify.department.shizheng
                  whistle -> dispatch.notify.street.350404002
            "#]],
        );
        // Parked late: the whistle blown first is cleared in the same commit.
        check(
            &with(
                filed("1201"),
                minutes(180),
                street,
                Action::Park {
                    reason: "纳入改造计划".to_owned(),
                },
            ),
            expect![[r#"
                incident.deadline_missed
                incident.whistle_blown
                incident.parked
                  deadline_missed -> dispatch.notify.department.shizheng
            "#]],
        );
        // The shell records the miss: the street is told of the whistle it blows, the
        // department of its summons.
        let whistled = with(filed("1201"), minutes(60), system, Action::DeadlineElapsed);
        check(
            &whistled,
            expect![[r#"
                incident.deadline_missed
                incident.whistle_blown
                  deadline_missed -> dispatch.notify.department.shizheng
                  whistle -> dispatch.notify.street.350404002
                  summoned -> dispatch.notify.department.shizheng due 2026-03-10T06:30:00Z
            "#]],
        );
        // Reassigned after that: the summons announced then is withdrawn now.
        check(
            &with(whistled.clone(), minutes(180), street, reassign()),
            expect![[r#"
                incident.dispatched
                incident.whistle_summons_withdrawn
                  assigned -> dispatch.notify.department.jiaojing due 2026-03-10T06:30:00Z
                  summons_withdrawn -> dispatch.notify.department.shizheng
            "#]],
        );
        // Reassigned late, before the shell recorded the miss: summoned and withdrawn in one
        // commit, so neither is announced.
        check(
            &with(filed("1201"), minutes(180), street, reassign()),
            expect![[r#"
                incident.deadline_missed
                incident.whistle_blown
                incident.dispatched
                incident.whistle_summons_withdrawn
                  deadline_missed -> dispatch.notify.department.shizheng
                  whistle -> dispatch.notify.street.350404002
                  assigned -> dispatch.notify.department.jiaojing due 2026-03-10T06:30:00Z
            "#]],
        );
        // An extension asked for once the whistle climbed to the district goes to the
        // district office, which decides it (`below_whistle_level` for the street).
        let at_district = with(
            with(
                with(
                    whistled.clone(),
                    minutes(270),
                    system,
                    Action::DeadlineElapsed,
                ),
                minutes(280),
                shizheng,
                Action::Acknowledge,
            ),
            minutes(290),
            shizheng,
            Action::RequestExtension {
                minutes: 60,
                reason: "需要封路".to_owned(),
            },
        );
        check(
            &at_district,
            expect![[r#"
                incident.extension_requested
                  extension_requested -> dispatch.notify.district.350404 due 2026-03-13T02:00:00Z
            "#]],
        );
        // Asked for after the resolution deadline passed, unrecorded: the commit records the
        // miss first, and the whistle it blows sets the joint deadline the request is about.
        let acknowledged = with(filed("1201"), minutes(10), shizheng, Action::Acknowledge);
        check(
            &with(
                acknowledged,
                minutes(4 * 24 * 60),
                shizheng,
                Action::RequestExtension {
                    minutes: 60,
                    reason: "需要封路".to_owned(),
                },
            ),
            expect![[r#"
                incident.deadline_missed
                incident.whistle_blown
                incident.extension_requested
                  deadline_missed -> dispatch.notify.department.shizheng
                  whistle -> dispatch.notify.street.350404002
                  summoned -> dispatch.notify.department.shizheng due 2026-03-16T03:00:00Z
                  extension_requested -> dispatch.notify.street.350404002 due 2026-03-18T09:30:00Z
            "#]],
        );
        // Street litter (0101) its grid worker resolved: the community verifies.
        let grid_worker = actor(Role::GridWorker, 5);
        let acknowledged = with(filed("0101"), minutes(10), grid_worker, Action::Acknowledge);
        check(
            &with(
                acknowledged,
                minutes(20),
                grid_worker,
                Action::Resolve {
                    note: "已清理".to_owned(),
                },
            ),
            expect![[r#"
                incident.resolved
                  to_verify -> dispatch.notify.community.350404002001
            "#]],
        );
    }

    #[test]
    fn notified_here_answers_once_and_forgets_the_oldest_first() {
        let mut here = NotifiedHere::default();
        here.insert(7);
        here.insert(7);
        assert!(here.take(7));
        assert!(!here.take(7), "a sequence is taken once");
        for sequence in 1..=NOTIFIED_HERE_MAX as u64 + 1 {
            here.insert(sequence);
        }
        assert!(
            here.take(7),
            "an entry taken earlier does not evict its later insertion"
        );
        assert!(!here.take(1), "the oldest was forgotten");
        assert!(here.take(2));
        assert!(here.take(NOTIFIED_HERE_MAX as u64 + 1));
        assert!(here.order.len() <= NOTIFIED_HERE_MAX);
    }
}
