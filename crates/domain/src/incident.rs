//! The incident aggregate: one resident's (or grid worker's) report, from intake to rating.
//!
//! The lifecycle is the closed loop of the digital urban-management standard GB/T 30428
//! (信息收集 → 案卷建立 → 任务派遣 → 任务处理 → 处理反馈 → 核查结案 → 综合评价):
//!
//! ```text
//! Reported ─File─► Filed ─Dispatch─► Dispatched ─Acknowledge─► Acknowledged ─Resolve─► Resolved
//!    │                                 │  ▲   (ReturnNotOurs, Reassign,      │             │
//!    └RejectReport► Rejected           │  │    RequestExtension, Park,       │   Verify(fail)
//!                                      │  └─── Unpark, whistles) ◄──────────┘◄────────────┤
//!                                      ▼                                      Verify(pass)│
//!                                   Parked                        Closed ◄────────────────┘
//!                                                                   │ Rate (unsatisfied may reopen)
//!                                                                   └ Reopen ─► Dispatched
//! ```
//!
//! plus `Cancel` by the reporter before resolution, `MergeDuplicate` (another report of the
//! same problem joins as an additional reporter) and `MarkDuplicateOf` (this report is
//! folded into another incident).
//!
//! # Whistle-and-report (吹哨报到)
//!
//! Sanming, 《关于加强城市社区治理的若干措施》 (2020), 七、提升社区治理效能:
//! "探索“街巷吹哨、部门报到”机制。按照属地管理原则，完善以街道党政领导为“街长”、社区主干为
//! “巷长”……对街道无法独立解决的事项，可通过“e三明”网上公共服务平台“乡呼县应”通道“吹哨”，
//! 县(市、区)职能部门快速“响应”、联动处置。"
//!
//! A whistle ([`Whistle`]) always has a cause ([`WhistleCause`]): an emergency category (blown
//! at dispatch), a missed response or resolution deadline (blown by [`Action::DeadlineElapsed`],
//! or first in the commit of a command that would replace the deadline: see
//! [`Action::records_misses_first`]),
//! a handler declaring the case beyond its powers, or summoned departments missing their report
//! deadline. An incident has at most one active whistle; a new cause while one is active
//! escalates it one rung up the ladder [`Level`] (grid → community 巷长 → street 街长 → district →
//! city). Every deadline is consumed by the event that records it missed, so a repeated
//! `DeadlineElapsed` can never escalate twice for the same cause. Each summoned department must
//! report (报到) by its `report_by`; a miss is a [`IncidentEvent::WhistleReportMissed`] naming
//! the department, followed by an escalation that summons it again one level higher.
//!
//! # Evaluation inputs (响应率、解决率、满意率)
//!
//! Everything a per-department / per-street evaluation needs is in the log. The street is the
//! first 9 digits of `Filed.grid`; the handler is named in the assigning event.
//!
//! | rate | denominator (assignments) | numerator |
//! |---|---|---|
//! | response rate | `Dispatched`, `Returned.rerouted_to`, `Reopened`, `Unparked` (handler from state) | `Acknowledged { late: false }` |
//! | response misses | — | `DeadlineMissed { deadline: Response, handler }` |
//! | whistle reporting | each `summoned` entry of `WhistleBlown` / `WhistleEscalated` | `WhistleReported { late: false }`; misses: `WhistleReportMissed` |
//! | resolution rate | same assignments | `Resolved { late: false }` followed by `Verified` (a `VerificationFailed` counts against) |
//! | satisfaction rate | `Rated` | `Rated { satisfaction: Satisfied or BasicallySatisfied }` |
//! | returns | — | `Returned { handler, rerouted_to }` (who returned it, where it went) |
//!
//! # `evolve` by value
//!
//! [`evolve`] takes the state by value and returns it, matching the design's
//! `evolve(State, &Event) -> State`: folding a history moves one state through without a clone,
//! and `decide` can evolve a scratch copy while it emits several events. [`IncidentState::apply`]
//! is the same thing in `&mut` form for services that keep states in a map.

use serde::{Deserialize, Serialize};

use crate::calendar::Clock;
use crate::ids::{
    Actor, ActorId, CategoryCode, DepartmentId, GridCode, IncidentId, Role, StreetCode, Timestamp,
};
use crate::policy::Policy;
use crate::routing::{Route, WhistleKind};
use crate::taxonomy::HandlingLevel;

/// Longest report description, in bytes: the intake contract's 4,000 characters at up to four
/// bytes of UTF-8 each. Descriptions live in events only, never in the in-memory state.
pub const DESCRIPTION_BYTES_MAX: usize = 16_000;
/// Longest note or reason text, in bytes.
pub const NOTE_BYTES_MAX: usize = 1_000;
/// Longest submission id kept with a filing, in bytes (intake accepts 8–64 ASCII characters).
pub const SUBMISSION_ID_BYTES_MAX: usize = 64;
/// Most additional reporters merged into one incident.
pub const CO_REPORTERS_MAX: usize = 16;
/// Most summons one whistle keeps in the state. Beyond it, summons that already reported
/// (then ones recorded missed) are dropped from the state — their record stays in the log.
pub const WHISTLE_SUMMONS_MAX: usize = 12;
/// Most "not ours" returns of one incident before the street must decide itself.
pub const RETURNS_MAX: usize = 4;
/// Most extensions granted per incident.
pub const EXTENSIONS_MAX: u8 = 2;
/// Longest single extension, in minutes of the category's clock.
pub const EXTENSION_MINUTES_MAX: u32 = 30 * 420;
/// Most reopenings of one incident.
pub const REOPENS_MAX: u8 = 3;
/// Most overdue items one `DeadlineElapsed` handles (a bound on its loop).
pub const DUE_ITEMS_MAX: usize = 64;

/// A WGS84 position in fixed point (1e-7 degrees), as reported by the app.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Position {
    pub lat_e7: i32,
    pub lon_e7: i32,
}

/// Who holds a case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Handler {
    GridWorker,
    Community,
    Street,
    Department(DepartmentId),
}

impl Handler {
    fn from_route(route: &Route) -> Handler {
        match route.level {
            HandlingLevel::GridWorker => Handler::GridWorker,
            HandlingLevel::Community => Handler::Community,
            HandlingLevel::Street => Handler::Street,
            HandlingLevel::Department => Handler::Department(route.department),
        }
    }

    /// Whether `role` speaks for this handler.
    pub fn is(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Handler::GridWorker, Role::GridWorker)
                | (Handler::Community, Role::Community)
                | (Handler::Street, Role::Street)
        ) || matches!((self, role), (Handler::Department(a), Role::Department(b)) if a == b)
    }

    /// The rung that blows the first whistle on this handler. A late department is whistled
    /// by the street (the Sanming "乡呼县应": the street calls, the county department answers).
    pub fn first_whistle_level(self) -> Level {
        match self {
            Handler::GridWorker => Level::Community,
            Handler::Community => Level::Street,
            Handler::Street => Level::District,
            Handler::Department(_) => Level::Street,
        }
    }
}

impl std::fmt::Display for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handler::GridWorker => f.write_str("grid_worker"),
            Handler::Community => f.write_str("community"),
            Handler::Street => f.write_str("street"),
            Handler::Department(d) => write!(f, "department:{d}"),
        }
    }
}

/// The escalation ladder: grid → community (巷长) → street (街长) → district → city.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Level {
    Grid,
    Community,
    Street,
    District,
    City,
}

impl Level {
    /// The next rung up; `None` at the top.
    pub fn up(self) -> Option<Level> {
        match self {
            Level::Grid => Some(Level::Community),
            Level::Community => Some(Level::Street),
            Level::Street => Some(Level::District),
            Level::District => Some(Level::City),
            Level::City => None,
        }
    }
}

/// Where an incident stands.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum Status {
    /// No event yet.
    #[default]
    Absent,
    Reported,
    Filed,
    Dispatched,
    Acknowledged,
    Resolved,
    Closed,
    Rejected,
    Cancelled,
    Parked,
    Merged,
}

impl Status {
    /// The status's public name (snake_case), as in the read models and the intake status view.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Absent => "absent",
            Status::Reported => "reported",
            Status::Filed => "filed",
            Status::Dispatched => "dispatched",
            Status::Acknowledged => "acknowledged",
            Status::Resolved => "resolved",
            Status::Closed => "closed",
            Status::Rejected => "rejected",
            Status::Cancelled => "cancelled",
            Status::Parked => "parked",
            Status::Merged => "merged",
        }
    }
}

/// A resident's rating (好差评).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Satisfaction {
    Satisfied,
    BasicallySatisfied,
    Unsatisfied,
}

/// Why a report is not taken up.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum RejectReason {
    OutsideJurisdiction,
    NotAGovernmentMatter,
    InsufficientInformation,
    Malicious,
}

/// Why a handler returns a case as "not ours".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum ReturnReason {
    NotOurDuty,
    WrongLocation,
    WrongCategory,
}

/// How a handler was chosen.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum RouteSource {
    /// The city's routing table.
    Table,
    /// The street's override in the routing table.
    StreetOverride,
    /// The route's fallback list, after a return.
    Fallback,
    /// Back to the street (属地) after a return with no fallback left.
    Street,
    /// Chosen by a person (street, district or city).
    Manual,
}

/// Which deadline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum DeadlineKind {
    Response,
    Resolution,
}

/// Why a whistle was blown or escalated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum WhistleCause {
    /// The category is an emergency: blown at dispatch.
    Emergency,
    /// The handler missed a deadline (recorded by the `DeadlineMissed` event before it).
    DeadlineMissed(DeadlineKind),
    /// The handler declared the case beyond its powers.
    BeyondPowers,
    /// Summoned departments missed their report deadline (each recorded by a
    /// `WhistleReportMissed` event before it).
    ReportsMissed,
}

/// One department summoned by a whistle, with its report deadline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Summoned {
    pub department: DepartmentId,
    pub report_by: Timestamp,
}

/// Where a summoned department stands.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum ReportState {
    Pending,
    Reported,
    Missed,
}

/// A summoned department in the state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Summons {
    pub department: DepartmentId,
    pub report_by: Timestamp,
    pub state: ReportState,
}

/// The active whistle.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Whistle {
    pub kind: WhistleKind,
    pub level: Level,
    pub cause: WhistleCause,
    pub summons: Vec<Summons>,
}

/// A deadline and whether it has been recorded missed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Due {
    pub at: Timestamp,
    pub missed: bool,
}

/// What the resident wants (the Sanming "single intake": 咨询、建议、问题反映、投诉).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum SubmissionKind {
    Consultation,
    Suggestion,
    ProblemReport,
    Complaint,
}

/// Where a submission came from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Channel {
    /// The resident app (随手拍, snap-and-report).
    App,
    /// The 12345 hotline desk.
    Hotline,
    /// A grid worker on patrol.
    Patrol,
}

/// Everything that happened to an incident. Stored (postcard, via [`crate::encoding`]).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum IncidentEvent {
    Reported {
        incident: IncidentId,
        by: Actor,
        description: String,
        position: Option<Position>,
        category_hint: Option<CategoryCode>,
    },
    Filed {
        by: Actor,
        grid: GridCode,
        category: CategoryCode,
        emergency: bool,
    },
    ReportRejected {
        by: Actor,
        reason: RejectReason,
        note: String,
    },
    Dispatched {
        by: Actor,
        handler: Handler,
        source: RouteSource,
        clock: Clock,
        response_due: Timestamp,
        resolution_due: Timestamp,
    },
    Acknowledged {
        by: Actor,
        late: bool,
    },
    Resolved {
        by: Actor,
        late: bool,
        note: String,
    },
    VerificationFailed {
        by: Actor,
        note: String,
        resolution_due: Timestamp,
    },
    Verified {
        by: Actor,
    },
    Closed {
        by: Actor,
    },
    Rated {
        by: Actor,
        satisfaction: Satisfaction,
    },
    Reopened {
        by: Actor,
        reason: String,
        response_due: Timestamp,
        resolution_due: Timestamp,
    },
    Returned {
        by: Actor,
        handler: Handler,
        reason: ReturnReason,
        note: String,
        rerouted_to: Handler,
        source: RouteSource,
        response_due: Timestamp,
        resolution_due: Timestamp,
    },
    ExtensionRequested {
        by: Actor,
        minutes: u32,
        reason: String,
    },
    ExtensionApproved {
        by: Actor,
        minutes: u32,
        resolution_due: Timestamp,
    },
    ExtensionDenied {
        by: Actor,
        note: String,
    },
    Parked {
        by: Actor,
        reason: String,
    },
    Unparked {
        by: Actor,
        response_due: Timestamp,
        resolution_due: Timestamp,
    },
    DuplicateMerged {
        by: Actor,
        duplicate: IncidentId,
        reporter: ActorId,
    },
    MergedInto {
        by: Actor,
        original: IncidentId,
    },
    Cancelled {
        by: Actor,
    },
    DeadlineMissed {
        handler: Handler,
        deadline: DeadlineKind,
        due: Timestamp,
    },
    WhistleBlown {
        kind: WhistleKind,
        level: Level,
        cause: WhistleCause,
        summoned: Vec<Summoned>,
        /// A fresh resolution deadline for the joint handling, when the cause calls for one.
        resolution_due: Option<Timestamp>,
    },
    WhistleReported {
        by: Actor,
        department: DepartmentId,
        late: bool,
    },
    WhistleReportMissed {
        department: DepartmentId,
        due: Timestamp,
    },
    /// An office reassigned the case away from a department the active whistle had summoned
    /// and that had not yet reported: its summons is withdrawn, not left to fall due (and to
    /// escalate the whistle) over a case the department no longer holds.
    WhistleSummonsWithdrawn {
        by: Actor,
        department: DepartmentId,
    },
    WhistleEscalated {
        kind: WhistleKind,
        from: Level,
        to: Level,
        cause: WhistleCause,
        summoned: Vec<Summoned>,
        resolution_due: Option<Timestamp>,
    },
    /// The submission a filing came from, as intake took it: the receipt the reporter got
    /// (this incident, its grid from `Filed`, `respond_by`) and what an auditor needs. Stored in
    /// the filing's own commit, so a filing is one stored message. Never contact details.
    SubmissionTaken {
        submission_id: String,
        kind: SubmissionKind,
        channel: Channel,
        /// When the reporter says it happened.
        occurred_at: Timestamp,
        /// Media references the submission carried (the references stay with the reporter's app).
        media: u8,
        /// The expected response deadline the receipt promised.
        respond_by: Timestamp,
    },
}

impl IncidentEvent {
    /// Whether the event records a deadline found past, or the whistle such a miss blew or
    /// escalated: what [`Action::DeadlineElapsed`] writes, and what a command that
    /// [records misses first](Action::records_misses_first) may begin its commit with.
    pub fn records_a_miss(&self) -> bool {
        use IncidentEvent as E;
        match self {
            E::DeadlineMissed { .. } | E::WhistleReportMissed { .. } => true,
            E::WhistleBlown { cause, .. } | E::WhistleEscalated { cause, .. } => matches!(
                cause,
                WhistleCause::DeadlineMissed(_) | WhistleCause::ReportsMissed
            ),
            _ => false,
        }
    }

    /// Who decided this event, when the event names them (the reporter of a report, the
    /// department that acknowledged): for an auditor, not always the commit's actor (a
    /// filing commit is written by intake for the resident who reported). `None` for what the
    /// clock decided (missed deadlines, whistles) and for intake's bookkeeping.
    pub fn by(&self) -> Option<&Actor> {
        use IncidentEvent as E;
        match self {
            E::Reported { by, .. }
            | E::Filed { by, .. }
            | E::ReportRejected { by, .. }
            | E::Dispatched { by, .. }
            | E::Acknowledged { by, .. }
            | E::Resolved { by, .. }
            | E::VerificationFailed { by, .. }
            | E::Verified { by, .. }
            | E::Closed { by, .. }
            | E::Rated { by, .. }
            | E::Reopened { by, .. }
            | E::Returned { by, .. }
            | E::ExtensionRequested { by, .. }
            | E::ExtensionApproved { by, .. }
            | E::ExtensionDenied { by, .. }
            | E::Parked { by, .. }
            | E::Unparked { by, .. }
            | E::DuplicateMerged { by, .. }
            | E::MergedInto { by, .. }
            | E::Cancelled { by, .. }
            | E::WhistleReported { by, .. }
            | E::WhistleSummonsWithdrawn { by, .. } => Some(by),
            E::DeadlineMissed { .. }
            | E::WhistleBlown { .. }
            | E::WhistleReportMissed { .. }
            | E::WhistleEscalated { .. }
            | E::SubmissionTaken { .. } => None,
        }
    }
}

/// What an actor asks for.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Action {
    Report {
        incident: IncidentId,
        description: String,
        position: Option<Position>,
        category_hint: Option<CategoryCode>,
    },
    File {
        grid: GridCode,
        category: CategoryCode,
    },
    RejectReport {
        reason: RejectReason,
        note: String,
    },
    /// `to: None` routes by the table; `Some` is a person's choice (street and above), and on
    /// an already dispatched case it reassigns it.
    Dispatch {
        to: Option<Handler>,
    },
    Acknowledge,
    Resolve {
        note: String,
    },
    Verify {
        passed: bool,
        note: String,
    },
    Rate {
        satisfaction: Satisfaction,
        reopen: bool,
    },
    Reopen {
        reason: String,
    },
    ReturnNotOurs {
        reason: ReturnReason,
        note: String,
    },
    RequestExtension {
        minutes: u32,
        reason: String,
    },
    DecideExtension {
        approve: bool,
        note: String,
    },
    Park {
        reason: String,
    },
    Unpark,
    MergeDuplicate {
        duplicate: IncidentId,
        reporter: ActorId,
    },
    MarkDuplicateOf {
        original: IncidentId,
    },
    Cancel,
    DeclareBeyondPowers {
        reason: String,
    },
    ReportToWhistle,
    /// Sent by the shell when [`next_deadline`] has passed.
    DeadlineElapsed,
    /// Intake keeps, in the filing's own commit, the submission the incident was filed from
    /// and the response deadline its receipt promised (System only, right after `File`).
    TakeSubmission {
        submission_id: String,
        kind: SubmissionKind,
        channel: Channel,
        occurred_at: Timestamp,
        media: u8,
        respond_by: Timestamp,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Report { .. } => "report",
            Action::File { .. } => "file",
            Action::RejectReport { .. } => "reject_report",
            Action::Dispatch { .. } => "dispatch",
            Action::Acknowledge => "acknowledge",
            Action::Resolve { .. } => "resolve",
            Action::Verify { .. } => "verify",
            Action::Rate { .. } => "rate",
            Action::Reopen { .. } => "reopen",
            Action::ReturnNotOurs { .. } => "return_not_ours",
            Action::RequestExtension { .. } => "request_extension",
            Action::DecideExtension { .. } => "decide_extension",
            Action::Park { .. } => "park",
            Action::Unpark => "unpark",
            Action::MergeDuplicate { .. } => "merge_duplicate",
            Action::MarkDuplicateOf { .. } => "mark_duplicate_of",
            Action::Cancel => "cancel",
            Action::DeclareBeyondPowers { .. } => "declare_beyond_powers",
            Action::ReportToWhistle => "report_to_whistle",
            Action::DeadlineElapsed => "deadline_elapsed",
            Action::TakeSubmission { .. } => "take_submission",
        }
    }

    /// Whether [`decide`] first records the deadlines already past at the command's time
    /// (`DeadlineMissed`, `WhistleReportMissed` and the whistle they blow, as
    /// [`Action::DeadlineElapsed`] would) before the action's own events: true for every
    /// decision on a handled case (a handler's, an office's, the reporter's). Without it a
    /// command decided after a deadline passed but before the shell recorded the miss would
    /// replace or clear that deadline and erase the miss (a return, a reassignment, parking,
    /// cancelling), or get a different answer than had the shell decided first (an
    /// acknowledgement with no whistle, a report to a whistle that had already climbed): the
    /// log would depend on which of the two the shell happened to decide first. False for
    /// intake's filing and bookkeeping (`Report`, `File`, `TakeSubmission`, `RejectReport`,
    /// `MergeDuplicate`, `MarkDuplicateOf`), which neither read nor change a deadline, and for
    /// `DeadlineElapsed`, which is the recording itself.
    pub fn records_misses_first(&self) -> bool {
        !matches!(
            self,
            Action::Report { .. }
                | Action::File { .. }
                | Action::TakeSubmission { .. }
                | Action::RejectReport { .. }
                | Action::MergeDuplicate { .. }
                | Action::MarkDuplicateOf { .. }
                | Action::DeadlineElapsed
        )
    }

    /// Whether a commit whose events are `events` can be this action's: its first event is
    /// the one [`decide`] emits first for the action ([`Action::writes_first`]), after any
    /// misses it recorded first ([`Action::records_misses_first`]). Tells a resent command
    /// from a command id reused for another action when only the stored commit is left to
    /// compare with.
    pub fn opens<'a>(&self, events: impl IntoIterator<Item = &'a IncidentEvent>) -> bool {
        let mut events = events.into_iter();
        let first = if self.records_misses_first() {
            events.find(|event| !event.records_a_miss())
        } else {
            events.next()
        };
        first.is_some_and(|event| self.writes_first(event))
    }

    /// Whether `event` can be the first event [`decide`] emits for this action itself (after
    /// any misses recorded first: see [`Action::opens`]).
    pub fn writes_first(&self, event: &IncidentEvent) -> bool {
        use IncidentEvent as E;
        match self {
            Action::Report { .. } => matches!(event, E::Reported { .. }),
            Action::File { .. } => matches!(event, E::Filed { .. }),
            Action::RejectReport { .. } => matches!(event, E::ReportRejected { .. }),
            Action::Dispatch { .. } => matches!(event, E::Dispatched { .. }),
            Action::Acknowledge => matches!(event, E::Acknowledged { .. }),
            Action::Resolve { .. } => matches!(event, E::Resolved { .. }),
            Action::Verify { .. } => {
                matches!(event, E::Verified { .. } | E::VerificationFailed { .. })
            }
            Action::Rate { .. } => matches!(event, E::Rated { .. }),
            Action::Reopen { .. } => matches!(event, E::Reopened { .. }),
            Action::ReturnNotOurs { .. } => matches!(event, E::Returned { .. }),
            Action::RequestExtension { .. } => matches!(event, E::ExtensionRequested { .. }),
            Action::DecideExtension { .. } => {
                matches!(
                    event,
                    E::ExtensionApproved { .. } | E::ExtensionDenied { .. }
                )
            }
            Action::Park { .. } => matches!(event, E::Parked { .. }),
            Action::Unpark => matches!(event, E::Unparked { .. }),
            Action::MergeDuplicate { .. } => matches!(event, E::DuplicateMerged { .. }),
            Action::MarkDuplicateOf { .. } => matches!(event, E::MergedInto { .. }),
            Action::Cancel => matches!(event, E::Cancelled { .. }),
            Action::DeclareBeyondPowers { .. } => {
                matches!(event, E::WhistleBlown { .. } | E::WhistleEscalated { .. })
            }
            Action::ReportToWhistle => matches!(event, E::WhistleReported { .. }),
            Action::DeadlineElapsed => matches!(
                event,
                E::DeadlineMissed { .. } | E::WhistleReportMissed { .. }
            ),
            Action::TakeSubmission { .. } => matches!(event, E::SubmissionTaken { .. }),
        }
    }
}

/// A command: who asks, and what.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct IncidentCommand {
    pub actor: Actor,
    pub action: Action,
}

/// A business refusal. No events are produced.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error, Serialize)]
pub enum Rejection {
    #[error("no incident has been reported under this id")]
    NoSuchIncident,
    #[error("an incident with this id already exists")]
    AlreadyExists,
    #[error("{command} is not possible while the incident is {status:?}")]
    InvalidTransition {
        command: &'static str,
        status: Status,
    },
    #[error("role {role} may not {command}")]
    Forbidden { command: &'static str, role: Role },
    #[error("{role} may not {command}: the case is neither assigned to it nor summoned it")]
    NotAssigned { command: &'static str, role: Role },
    #[error("only a reporter of this incident may {command}")]
    NotReporter { command: &'static str },
    #[error("category {0} is not a fileable category of the taxonomy")]
    UnknownCategory(CategoryCode),
    #[error("department {0} is not in the routing table")]
    UnknownDepartment(DepartmentId),
    #[error("category {category} has no route for street {street}")]
    NoRoute {
        category: CategoryCode,
        street: StreetCode,
    },
    #[error("{field} is {bytes} bytes, more than {max}")]
    TextTooLong {
        field: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("{field} must not be empty")]
    EmptyText { field: &'static str },
    #[error("no deadline has passed (next: {next:?})")]
    NothingDue { next: Option<Timestamp> },
    #[error("the handler has not acknowledged the case")]
    NotAcknowledged,
    #[error("an extension request is already pending")]
    ExtensionPending,
    #[error("no extension request is pending")]
    NoExtensionPending,
    #[error("{EXTENSIONS_MAX} extensions were already granted")]
    ExtensionsExhausted,
    #[error("extension of {minutes} minutes is outside 1..={EXTENSION_MINUTES_MAX}")]
    ExtensionMinutes { minutes: u32 },
    #[error("the resolution deadline has already been missed")]
    ResolutionAlreadyMissed,
    #[error("the case was already returned {RETURNS_MAX} times; the street must decide")]
    ReturnsExhausted,
    #[error("the street owns its cases and reassigns them instead of returning them")]
    StreetCannotReturn,
    #[error("the case is already assigned to {0}")]
    SameHandler(Handler),
    #[error("the incident was already rated")]
    AlreadyRated,
    #[error("the incident was already reopened {REOPENS_MAX} times")]
    ReopensExhausted,
    #[error("no whistle is active")]
    NoActiveWhistle,
    #[error("department {0} was not summoned by the active whistle")]
    NotSummoned(DepartmentId),
    #[error("department {0} has already reported")]
    AlreadyReportedToWhistle(DepartmentId),
    #[error("the handler already declared this assignment beyond its powers")]
    AlreadyDeclared,
    #[error("the one who resolved the case may not {command} it")]
    OwnWork { command: &'static str },
    #[error("{role} may not {command}: the active whistle is at the {level:?} level, above it")]
    BelowWhistleLevel {
        command: &'static str,
        role: Role,
        level: Level,
    },
    #[error("the whistle is already at the top of the ladder")]
    TopOfLadder,
    #[error("more than {CO_REPORTERS_MAX} additional reporters")]
    TooManyReporters,
    #[error("{0} is already a reporter of this incident")]
    AlreadyAReporter(ActorId),
    #[error("an incident cannot be merged with itself")]
    SelfMerge,
}

/// The state `decide` needs; built by folding events with [`evolve`]. Compact on purpose:
/// see the crate docs for the measured size.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct IncidentState {
    pub status: Status,
    pub incident: Option<IncidentId>,
    pub reporter: Option<ActorId>,
    pub co_reporters: Vec<ActorId>,
    pub grid: Option<GridCode>,
    pub category: Option<CategoryCode>,
    pub emergency: bool,
    pub handler: Option<Handler>,
    pub response: Option<Due>,
    pub resolution: Option<Due>,
    /// Whether a resolution deadline was missed during the current assignment.
    pub resolution_missed: bool,
    pub whistle: Option<Whistle>,
    /// Handlers that returned the case as "not ours", in order.
    pub returned_by: Vec<Handler>,
    pub pending_extension: Option<u32>,
    pub extensions_granted: u8,
    pub reopens: u8,
    pub beyond_powers_declared: bool,
    pub emergency_whistled: bool,
    pub rating: Option<Satisfaction>,
    /// Who resolved the case last: the one actor that may not verify that work.
    pub resolved_by: Option<ActorId>,
}

impl IncidentState {
    /// Folds a history.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a IncidentEvent>) -> IncidentState {
        events.into_iter().fold(IncidentState::default(), evolve)
    }

    pub fn street(&self) -> Option<StreetCode> {
        self.grid.map(GridCode::street)
    }

    /// Bytes this state owns on the heap (for the memory budget).
    pub fn heap_bytes(&self) -> usize {
        self.co_reporters.capacity() * std::mem::size_of::<ActorId>()
            + self.returned_by.capacity() * std::mem::size_of::<Handler>()
            + self
                .whistle
                .as_ref()
                .map_or(0, |w| w.summons.capacity() * std::mem::size_of::<Summons>())
    }

    /// Whether the incident is finished for the handlers (nothing more is due from them).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status,
            Status::Closed | Status::Rejected | Status::Cancelled | Status::Merged
        )
    }

    /// Applies one event in place (see [`evolve`]). Total: never panics, whatever the event.
    pub fn apply(&mut self, event: &IncidentEvent) {
        use IncidentEvent as E;
        match event {
            // The intake record of the filing: nothing the handlers act on.
            E::SubmissionTaken { .. } => {}
            E::Reported { incident, by, .. } => {
                self.status = Status::Reported;
                self.incident = Some(*incident);
                self.reporter = Some(by.id);
            }
            E::Filed {
                grid,
                category,
                emergency,
                ..
            } => {
                self.status = Status::Filed;
                self.grid = Some(*grid);
                self.category = Some(*category);
                self.emergency = *emergency;
            }
            E::ReportRejected { .. } => self.status = Status::Rejected,
            E::Dispatched {
                handler,
                response_due,
                resolution_due,
                ..
            } => {
                self.assign(*handler, *response_due, *resolution_due);
            }
            E::Acknowledged { .. } => {
                self.status = Status::Acknowledged;
                self.response = None;
            }
            E::Resolved { by, .. } => {
                self.resolved_by = Some(by.id);
                self.status = Status::Resolved;
                self.response = None;
                self.resolution = None;
                self.whistle = None;
                self.pending_extension = None;
            }
            E::VerificationFailed { resolution_due, .. } => {
                self.status = Status::Acknowledged;
                self.resolution = Some(Due {
                    at: *resolution_due,
                    missed: false,
                });
                self.resolution_missed = false;
                // The work starts over: a handler that declared the case beyond its powers
                // before resolving it (the whistle that raised ended with the resolution) may
                // declare again.
                self.beyond_powers_declared = false;
            }
            E::Verified { .. } => {}
            E::Closed { .. } => self.status = Status::Closed,
            E::Rated { satisfaction, .. } => self.rating = Some(*satisfaction),
            E::Reopened {
                response_due,
                resolution_due,
                ..
            } => {
                self.reopens = self.reopens.saturating_add(1);
                self.rating = None;
                let handler = self.handler.unwrap_or(Handler::Street);
                self.assign(handler, *response_due, *resolution_due);
            }
            E::Returned {
                handler,
                rerouted_to,
                response_due,
                resolution_due,
                ..
            } => {
                push_exact(&mut self.returned_by, *handler);
                self.assign(*rerouted_to, *response_due, *resolution_due);
            }
            E::ExtensionRequested { minutes, .. } => self.pending_extension = Some(*minutes),
            E::ExtensionApproved { resolution_due, .. } => {
                self.pending_extension = None;
                self.extensions_granted = self.extensions_granted.saturating_add(1);
                self.resolution = Some(Due {
                    at: *resolution_due,
                    missed: false,
                });
            }
            E::ExtensionDenied { .. } => self.pending_extension = None,
            E::Parked { .. } => {
                self.status = Status::Parked;
                self.response = None;
                self.resolution = None;
                self.whistle = None;
                self.pending_extension = None;
            }
            E::Unparked {
                response_due,
                resolution_due,
                ..
            } => {
                let handler = self.handler.unwrap_or(Handler::Street);
                self.assign(handler, *response_due, *resolution_due);
            }
            E::DuplicateMerged { reporter, .. } => push_exact(&mut self.co_reporters, *reporter),
            E::MergedInto { .. } => self.status = Status::Merged,
            E::Cancelled { .. } => {
                self.status = Status::Cancelled;
                self.response = None;
                self.resolution = None;
                self.whistle = None;
            }
            E::DeadlineMissed { deadline, .. } => match deadline {
                DeadlineKind::Response => {
                    if let Some(d) = &mut self.response {
                        d.missed = true;
                    }
                }
                DeadlineKind::Resolution => {
                    // A pending extension request lapses with the deadline it asked to move.
                    self.pending_extension = None;
                    self.resolution_missed = true;
                    if let Some(d) = &mut self.resolution {
                        d.missed = true;
                    }
                }
            },
            E::WhistleBlown {
                kind,
                level,
                cause,
                summoned,
                resolution_due,
            } => {
                if *cause == WhistleCause::Emergency {
                    self.emergency_whistled = true;
                }
                if *cause == WhistleCause::BeyondPowers {
                    self.beyond_powers_declared = true;
                }
                let summons = summoned
                    .iter()
                    .map(|s| Summons {
                        department: s.department,
                        report_by: s.report_by,
                        state: ReportState::Pending,
                    })
                    .collect();
                self.whistle = Some(Whistle {
                    kind: *kind,
                    level: *level,
                    cause: *cause,
                    summons,
                });
                if let Some(at) = resolution_due {
                    self.resolution = Some(Due {
                        at: *at,
                        missed: false,
                    });
                }
            }
            E::WhistleReported { department, .. } => {
                if let Some(s) = self.summons_mut(*department) {
                    s.state = ReportState::Reported;
                }
            }
            E::WhistleReportMissed { department, .. } => {
                if let Some(s) = self.summons_mut(*department)
                    && s.state == ReportState::Pending
                {
                    s.state = ReportState::Missed;
                }
            }
            E::WhistleSummonsWithdrawn { department, .. } => {
                if let Some(whistle) = &mut self.whistle {
                    whistle
                        .summons
                        .retain(|s| s.department != *department || s.state != ReportState::Pending);
                }
            }
            E::WhistleEscalated {
                kind,
                to,
                cause,
                summoned,
                resolution_due,
                ..
            } => {
                if *cause == WhistleCause::BeyondPowers {
                    self.beyond_powers_declared = true;
                }
                let whistle = self.whistle.get_or_insert_with(|| Whistle {
                    kind: *kind,
                    level: *to,
                    cause: *cause,
                    summons: Vec::new(),
                });
                whistle.kind = *kind;
                whistle.level = *to;
                whistle.cause = *cause;
                for s in summoned {
                    let fresh = Summons {
                        department: s.department,
                        report_by: s.report_by,
                        state: ReportState::Pending,
                    };
                    match whistle
                        .summons
                        .iter_mut()
                        .find(|x| x.department == s.department)
                    {
                        Some(x) => *x = fresh,
                        None => push_exact(&mut whistle.summons, fresh),
                    }
                }
                for settled in [ReportState::Reported, ReportState::Missed] {
                    while whistle.summons.len() > WHISTLE_SUMMONS_MAX {
                        match whistle.summons.iter().position(|x| x.state == settled) {
                            Some(at) => {
                                whistle.summons.remove(at);
                            }
                            None => break,
                        }
                    }
                }
                whistle.summons.shrink_to_fit();
                if let Some(at) = resolution_due {
                    self.resolution = Some(Due {
                        at: *at,
                        missed: false,
                    });
                }
            }
        }
    }

    fn assign(&mut self, handler: Handler, response_due: Timestamp, resolution_due: Timestamp) {
        self.status = Status::Dispatched;
        self.handler = Some(handler);
        self.response = Some(Due {
            at: response_due,
            missed: false,
        });
        self.resolution = Some(Due {
            at: resolution_due,
            missed: false,
        });
        self.resolution_missed = false;
        self.pending_extension = None;
        self.beyond_powers_declared = false;
    }

    fn summons_mut(&mut self, department: DepartmentId) -> Option<&mut Summons> {
        self.whistle
            .as_mut()?
            .summons
            .iter_mut()
            .find(|s| s.department == department)
    }

    fn summons(&self, department: DepartmentId) -> Option<&Summons> {
        self.whistle
            .as_ref()?
            .summons
            .iter()
            .find(|s| s.department == department)
    }
}

/// Pushes without the doubling growth of `Vec::push`: per-incident lists are short and rarely
/// grow, and the memory budget counts capacity.
fn push_exact<T>(list: &mut Vec<T>, item: T) {
    list.reserve_exact(1);
    list.push(item);
}

/// Applies one event to a state (by value; see the module docs for why).
pub fn evolve(mut state: IncidentState, event: &IncidentEvent) -> IncidentState {
    state.apply(event);
    state
}

/// One thing that can fall due.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DueItem {
    Response(Timestamp),
    Resolution(Timestamp),
    Report(DepartmentId, Timestamp),
}

impl DueItem {
    fn at(self) -> Timestamp {
        match self {
            DueItem::Response(t) | DueItem::Resolution(t) | DueItem::Report(_, t) => t,
        }
    }
}

fn due_items(state: &IncidentState) -> impl Iterator<Item = DueItem> + '_ {
    let response = state
        .response
        .filter(|d| !d.missed)
        .map(|d| DueItem::Response(d.at));
    let resolution = state
        .resolution
        .filter(|d| !d.missed)
        .map(|d| DueItem::Resolution(d.at));
    let reports = state
        .whistle
        .iter()
        .flat_map(|w| w.summons.iter())
        .filter(|s| s.state == ReportState::Pending)
        .map(|s| DueItem::Report(s.department, s.report_by));
    response.into_iter().chain(resolution).chain(reports)
}

/// When the shell must next send [`Action::DeadlineElapsed`]; `None` if nothing is pending.
pub fn next_deadline(state: &IncidentState) -> Option<Timestamp> {
    if state.is_terminal() || state.status == Status::Parked {
        return None;
    }
    due_items(state).map(DueItem::at).min()
}

/// Decides what a command means for an incident. Pure: `now` and `policy` are inputs.
pub fn decide(
    state: &IncidentState,
    command: IncidentCommand,
    now: Timestamp,
    policy: &Policy,
) -> Result<Vec<IncidentEvent>, Rejection> {
    let mut d = Decision {
        state: state.clone(),
        events: Vec::new(),
        now,
        policy,
        actor: command.actor,
    };
    if command.action.records_misses_first()
        && next_deadline(&d.state).is_some_and(|due| due <= now)
        && d.deadlines_elapsed().is_err()
    {
        // What the shell's `DeadlineElapsed` would be refused too (no route left for the
        // category): the action is decided on the state as it is, as before it was late.
        d.state = state.clone();
        d.events.clear();
    }
    d.run(command.action)?;
    Ok(d.events)
}

/// A decision in progress: events are applied to a scratch state as they are emitted, so
/// multi-event decisions see their own effects.
struct Decision<'a> {
    state: IncidentState,
    events: Vec<IncidentEvent>,
    now: Timestamp,
    policy: &'a Policy,
    actor: Actor,
}

fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), Rejection> {
    if text.len() > max {
        return Err(Rejection::TextTooLong {
            field,
            bytes: text.len(),
            max,
        });
    }
    Ok(())
}

fn check_reason(field: &'static str, text: &str) -> Result<(), Rejection> {
    if text.trim().is_empty() {
        return Err(Rejection::EmptyText { field });
    }
    check_text(field, text, NOTE_BYTES_MAX)
}

impl Decision<'_> {
    fn emit(&mut self, event: IncidentEvent) {
        self.state.apply(&event);
        self.events.push(event);
    }

    fn role(&self) -> Role {
        self.actor.role
    }

    fn require_role(&self, command: &'static str, allowed: &[Role]) -> Result<(), Rejection> {
        if allowed.contains(&self.role()) {
            Ok(())
        } else {
            Err(Rejection::Forbidden {
                command,
                role: self.role(),
            })
        }
    }

    /// A supervisor's decision on a case (parking it, reassigning it, deciding an extension)
    /// is taken at the active whistle's level or above: once the whistle has climbed to the
    /// district, the street no longer decides for the case alone. The system (the city's own
    /// automation) is not bound.
    fn require_whistle_level(&self, command: &'static str) -> Result<(), Rejection> {
        let role_level = match self.role() {
            Role::Street => Level::Street,
            Role::District => Level::District,
            Role::City => Level::City,
            _ => return Ok(()),
        };
        match &self.state.whistle {
            Some(whistle) if whistle.level > role_level => Err(Rejection::BelowWhistleLevel {
                command,
                role: self.role(),
                level: whistle.level,
            }),
            _ => Ok(()),
        }
    }

    fn require_status(&self, command: &'static str, allowed: &[Status]) -> Result<(), Rejection> {
        if self.state.status == Status::Absent && !allowed.contains(&Status::Absent) {
            return Err(Rejection::NoSuchIncident);
        }
        if allowed.contains(&self.state.status) {
            Ok(())
        } else {
            Err(Rejection::InvalidTransition {
                command,
                status: self.state.status,
            })
        }
    }

    /// The actor must speak for the current handler, and the case be in one of `allowed`. The
    /// role is checked before the state: an actor that is not the handler is told
    /// `not_assigned`, and learns nothing of where the case stands.
    fn require_handler_in(
        &self,
        command: &'static str,
        allowed: &[Status],
    ) -> Result<Handler, Rejection> {
        if self.state.status == Status::Absent {
            return Err(Rejection::NoSuchIncident);
        }
        let handler = self.require_handler(command)?;
        self.require_status(command, allowed)?;
        Ok(handler)
    }

    /// The actor must speak for the current handler.
    fn require_handler(&self, command: &'static str) -> Result<Handler, Rejection> {
        let handler = self.state.handler.unwrap_or(Handler::Street);
        if handler.is(self.role()) {
            Ok(handler)
        } else if matches!(
            self.role(),
            Role::Department(_) | Role::GridWorker | Role::Community | Role::Street
        ) {
            Err(Rejection::NotAssigned {
                command,
                role: self.role(),
            })
        } else {
            Err(Rejection::Forbidden {
                command,
                role: self.role(),
            })
        }
    }

    fn route(&self) -> Result<(Route, RouteSource), Rejection> {
        let (Some(category), Some(street)) = (self.state.category, self.state.street()) else {
            return Err(Rejection::InvalidTransition {
                command: "route",
                status: self.state.status,
            });
        };
        let table = &self.policy.routing;
        let route = table
            .route(category, street)
            .ok_or(Rejection::NoRoute { category, street })?;
        let source = if table.has_override(category, street) {
            RouteSource::StreetOverride
        } else {
            RouteSource::Table
        };
        Ok((route.clone(), source))
    }

    /// Response and resolution deadlines for a fresh assignment, from now.
    fn deadlines(&self, route: &Route) -> (Timestamp, Timestamp) {
        let calendar = &self.policy.calendar;
        (
            calendar.add(self.now, route.response_minutes, route.clock),
            calendar.add(self.now, route.resolution_minutes, route.clock),
        )
    }

    fn summon(
        &self,
        kind: WhistleKind,
        departments: impl IntoIterator<Item = DepartmentId>,
    ) -> Vec<Summoned> {
        let limit = self.policy.routing.whistle.for_kind(kind);
        let report_by = self
            .policy
            .calendar
            .add(self.now, limit.report_limit_minutes, limit.clock);
        departments
            .into_iter()
            .map(|department| Summoned {
                department,
                report_by,
            })
            .collect()
    }

    fn is_reporter(&self) -> bool {
        self.role() == Role::Resident
            && (self.state.reporter == Some(self.actor.id)
                || self.state.co_reporters.contains(&self.actor.id))
    }

    fn run(&mut self, action: Action) -> Result<(), Rejection> {
        use Role as R;
        use Status as S;
        let command = action.name();
        const OFFICE: &[Role] = &[R::System, R::Community, R::Street, R::District, R::City];
        const SUPERVISOR: &[Role] = &[R::Street, R::District, R::City];
        const ACTIVE: &[Status] = &[S::Dispatched, S::Acknowledged];
        let actor = self.actor;
        match action {
            Action::Report {
                incident,
                description,
                position,
                category_hint,
            } => {
                if self.state.status != S::Absent {
                    return Err(Rejection::AlreadyExists);
                }
                self.require_role(
                    command,
                    &[R::Resident, R::GridWorker, R::Community, R::System],
                )?;
                if description.trim().is_empty() {
                    return Err(Rejection::EmptyText {
                        field: "description",
                    });
                }
                check_text("description", &description, DESCRIPTION_BYTES_MAX)?;
                self.emit(IncidentEvent::Reported {
                    incident,
                    by: actor,
                    description,
                    position,
                    category_hint,
                });
            }
            Action::File { grid, category } => {
                self.require_status(command, &[S::Reported])?;
                self.require_role(command, OFFICE)?;
                if !self.policy.taxonomy.is_leaf(category) {
                    return Err(Rejection::UnknownCategory(category));
                }
                let emergency = self
                    .policy
                    .taxonomy
                    .get(category)
                    .is_some_and(|c| c.emergency);
                if self.policy.routing.route(category, grid.street()).is_none() {
                    return Err(Rejection::NoRoute {
                        category,
                        street: grid.street(),
                    });
                }
                self.emit(IncidentEvent::Filed {
                    by: actor,
                    grid,
                    category,
                    emergency,
                });
            }
            Action::TakeSubmission {
                submission_id,
                kind,
                channel,
                occurred_at,
                media,
                respond_by,
            } => {
                self.require_status(command, &[S::Filed])?;
                self.require_role(command, &[R::System])?;
                if submission_id.trim().is_empty() {
                    return Err(Rejection::EmptyText {
                        field: "submission_id",
                    });
                }
                check_text("submission_id", &submission_id, SUBMISSION_ID_BYTES_MAX)?;
                self.emit(IncidentEvent::SubmissionTaken {
                    submission_id,
                    kind,
                    channel,
                    occurred_at,
                    media,
                    respond_by,
                });
            }
            Action::RejectReport { reason, note } => {
                self.require_status(command, &[S::Reported])?;
                self.require_role(command, OFFICE)?;
                check_text("note", &note, NOTE_BYTES_MAX)?;
                self.emit(IncidentEvent::ReportRejected {
                    by: actor,
                    reason,
                    note,
                });
            }
            Action::Dispatch { to } => self.dispatch(to)?,
            Action::Acknowledge => {
                self.require_handler_in(command, &[S::Dispatched])?;
                let late = self
                    .state
                    .response
                    .is_some_and(|d| d.missed || self.now > d.at);
                self.emit(IncidentEvent::Acknowledged { by: actor, late });
                // Acknowledging is reporting in (报到): a handler department that an active
                // whistle summoned has reported to it, in the same commit, rather than being
                // recorded as missing its report and escalated while it works the case.
                self.report_own_summons(actor);
            }
            Action::Resolve { note } => {
                // A summoned department that reported may resolve jointly; not one that
                // returned the case as not its own (returning answered its summons too).
                let reported_summons = matches!(self.role(), R::Department(d)
                    if self.state.summons(d).is_some_and(|s| s.state == ReportState::Reported)
                        && !self.state.returned_by.contains(&Handler::Department(d)));
                if reported_summons {
                    self.require_status(command, ACTIVE)?;
                } else {
                    self.require_handler_in(command, ACTIVE)?;
                    if self.state.status != S::Acknowledged {
                        return Err(Rejection::NotAcknowledged);
                    }
                }
                check_text("note", &note, NOTE_BYTES_MAX)?;
                let late = self.state.resolution_missed
                    || self.state.resolution.is_some_and(|d| self.now > d.at);
                self.emit(IncidentEvent::Resolved {
                    by: actor,
                    late,
                    note,
                });
            }
            Action::Verify { passed, note } => {
                self.require_status(command, &[S::Resolved])?;
                // Verification (核查) is the grid's check on the handler's work, so not by the
                // one who did it: a case a grid worker handled is verified by another grid
                // worker or by the community (巷长), to which dispatch sends the `to_verify`.
                self.require_role(command, &[R::GridWorker, R::Community])?;
                if self.state.resolved_by == Some(actor.id) {
                    return Err(Rejection::OwnWork { command });
                }
                check_text("note", &note, NOTE_BYTES_MAX)?;
                if passed {
                    self.emit(IncidentEvent::Verified { by: actor });
                    self.emit(IncidentEvent::Closed { by: actor });
                } else {
                    check_reason("note", &note)?;
                    let (route, _) = self.route()?;
                    let resolution_due =
                        self.policy
                            .calendar
                            .add(self.now, route.resolution_minutes, route.clock);
                    self.emit(IncidentEvent::VerificationFailed {
                        by: actor,
                        note,
                        resolution_due,
                    });
                }
            }
            Action::Rate {
                satisfaction,
                reopen,
            } => {
                self.require_status(command, &[S::Closed])?;
                self.require_role(command, &[R::Resident])?;
                if !self.is_reporter() {
                    return Err(Rejection::NotReporter { command });
                }
                if self.state.rating.is_some() {
                    return Err(Rejection::AlreadyRated);
                }
                let reopen = reopen && satisfaction == Satisfaction::Unsatisfied;
                if reopen && self.state.reopens >= REOPENS_MAX {
                    return Err(Rejection::ReopensExhausted);
                }
                self.emit(IncidentEvent::Rated {
                    by: actor,
                    satisfaction,
                });
                if reopen {
                    self.reopen("resident unsatisfied".to_owned())?;
                }
            }
            Action::Reopen { reason } => {
                self.require_status(command, &[S::Closed])?;
                self.require_role(command, OFFICE)?;
                check_reason("reason", &reason)?;
                if self.state.reopens >= REOPENS_MAX {
                    return Err(Rejection::ReopensExhausted);
                }
                self.reopen(reason)?;
            }
            Action::ReturnNotOurs { reason, note } => {
                let handler = self.require_handler_in(command, ACTIVE)?;
                if handler == Handler::Street {
                    return Err(Rejection::StreetCannotReturn);
                }
                check_reason("note", &note)?;
                if self.state.returned_by.len() >= RETURNS_MAX {
                    return Err(Rejection::ReturnsExhausted);
                }
                let (route, _) = self.route()?;
                let tried = |h: Handler| h == handler || self.state.returned_by.contains(&h);
                let mut candidates: Vec<Handler> = Vec::new();
                if !matches!(handler, Handler::Department(_)) {
                    // A grid worker or community hands up to the responsible department.
                    candidates.push(Handler::Department(route.department));
                }
                candidates.extend(route.fallback.iter().map(|d| Handler::Department(*d)));
                let (rerouted_to, source) = match candidates.into_iter().find(|h| !tried(*h)) {
                    Some(h) => (
                        h,
                        if h == Handler::Department(route.department) {
                            RouteSource::Table
                        } else {
                            RouteSource::Fallback
                        },
                    ),
                    None => (Handler::Street, RouteSource::Street),
                };
                let (response_due, resolution_due) = self.deadlines(&route);
                self.emit(IncidentEvent::Returned {
                    by: actor,
                    handler,
                    reason,
                    note,
                    rerouted_to,
                    source,
                    response_due,
                    resolution_due,
                });
                // Answering a whistle's summons with "not ours" is reporting in (报到): the
                // department that returns the case is not left pending on it, to be recorded
                // as missing its report and the whistle escalated for a case it no longer has.
                self.report_own_summons(actor);
            }
            Action::RequestExtension { minutes, reason } => {
                self.require_handler_in(command, ACTIVE)?;
                check_reason("reason", &reason)?;
                if minutes == 0 || minutes > EXTENSION_MINUTES_MAX {
                    return Err(Rejection::ExtensionMinutes { minutes });
                }
                if self.state.pending_extension.is_some() {
                    return Err(Rejection::ExtensionPending);
                }
                if self.state.extensions_granted >= EXTENSIONS_MAX {
                    return Err(Rejection::ExtensionsExhausted);
                }
                // A deadline at or before `now` is missed, recorded or not (the shell's
                // `DeadlineElapsed` may not have run yet): granting time on it would erase the
                // miss, and the outcome would depend on which command the shell decided first.
                if self
                    .state
                    .resolution
                    .is_none_or(|d| d.missed || d.at <= self.now)
                {
                    return Err(Rejection::ResolutionAlreadyMissed);
                }
                self.emit(IncidentEvent::ExtensionRequested {
                    by: actor,
                    minutes,
                    reason,
                });
            }
            Action::DecideExtension { approve, note } => {
                self.require_status(command, ACTIVE)?;
                self.require_role(command, SUPERVISOR)?;
                self.require_whistle_level(command)?;
                check_text("note", &note, NOTE_BYTES_MAX)?;
                let Some(minutes) = self.state.pending_extension else {
                    return Err(Rejection::NoExtensionPending);
                };
                if approve {
                    // As for a request: a deadline at or before `now` is missed.
                    let Some(due) = self
                        .state
                        .resolution
                        .filter(|d| !d.missed && d.at > self.now)
                    else {
                        return Err(Rejection::ResolutionAlreadyMissed);
                    };
                    let (route, _) = self.route()?;
                    let resolution_due = self.policy.calendar.add(due.at, minutes, route.clock);
                    self.emit(IncidentEvent::ExtensionApproved {
                        by: actor,
                        minutes,
                        resolution_due,
                    });
                } else {
                    self.emit(IncidentEvent::ExtensionDenied { by: actor, note });
                }
            }
            Action::Park { reason } => {
                self.require_status(command, ACTIVE)?;
                self.require_role(command, SUPERVISOR)?;
                self.require_whistle_level(command)?;
                check_reason("reason", &reason)?;
                self.emit(IncidentEvent::Parked { by: actor, reason });
            }
            Action::Unpark => {
                self.require_status(command, &[S::Parked])?;
                self.require_role(command, SUPERVISOR)?;
                let (route, _) = self.route()?;
                let (response_due, resolution_due) = self.deadlines(&route);
                self.emit(IncidentEvent::Unparked {
                    by: actor,
                    response_due,
                    resolution_due,
                });
            }
            Action::MergeDuplicate {
                duplicate,
                reporter,
            } => {
                self.require_status(
                    command,
                    &[
                        S::Reported,
                        S::Filed,
                        S::Dispatched,
                        S::Acknowledged,
                        S::Resolved,
                        S::Parked,
                    ],
                )?;
                self.require_role(command, OFFICE)?;
                if self.state.incident == Some(duplicate) {
                    return Err(Rejection::SelfMerge);
                }
                if self.state.reporter == Some(reporter)
                    || self.state.co_reporters.contains(&reporter)
                {
                    return Err(Rejection::AlreadyAReporter(reporter));
                }
                if self.state.co_reporters.len() >= CO_REPORTERS_MAX {
                    return Err(Rejection::TooManyReporters);
                }
                self.emit(IncidentEvent::DuplicateMerged {
                    by: actor,
                    duplicate,
                    reporter,
                });
            }
            Action::MarkDuplicateOf { original } => {
                self.require_status(command, &[S::Reported, S::Filed])?;
                self.require_role(command, OFFICE)?;
                if self.state.incident == Some(original) {
                    return Err(Rejection::SelfMerge);
                }
                self.emit(IncidentEvent::MergedInto {
                    by: actor,
                    original,
                });
            }
            Action::Cancel => {
                self.require_status(
                    command,
                    &[
                        S::Reported,
                        S::Filed,
                        S::Dispatched,
                        S::Acknowledged,
                        S::Parked,
                    ],
                )?;
                self.require_role(command, &[R::Resident])?;
                if self.state.reporter != Some(actor.id) {
                    return Err(Rejection::NotReporter { command });
                }
                self.emit(IncidentEvent::Cancelled { by: actor });
            }
            Action::DeclareBeyondPowers { reason } => {
                let handler = self.require_handler_in(command, ACTIVE)?;
                check_reason("reason", &reason)?;
                if self.state.beyond_powers_declared {
                    return Err(Rejection::AlreadyDeclared);
                }
                let (route, _) = self.route()?;
                let others: Vec<DepartmentId> = route
                    .summon
                    .iter()
                    .copied()
                    .filter(|d| Handler::Department(*d) != handler)
                    .collect();
                let departments = if others.is_empty() {
                    route.summon.clone()
                } else {
                    others
                };
                let kind = if self.state.emergency {
                    WhistleKind::Emergency
                } else {
                    WhistleKind::Tough
                };
                let resolution_due = Some(self.policy.calendar.add(
                    self.now,
                    route.resolution_minutes,
                    route.clock,
                ));
                self.whistle(
                    kind,
                    handler.first_whistle_level(),
                    WhistleCause::BeyondPowers,
                    departments,
                    resolution_due,
                )?;
            }
            Action::ReportToWhistle => {
                self.require_status(command, ACTIVE)?;
                let R::Department(department) = self.role() else {
                    return Err(Rejection::Forbidden {
                        command,
                        role: self.role(),
                    });
                };
                if self.state.whistle.is_none() {
                    return Err(Rejection::NoActiveWhistle);
                }
                let summons = self
                    .state
                    .summons(department)
                    .ok_or(Rejection::NotSummoned(department))?;
                let late = match summons.state {
                    ReportState::Reported => {
                        return Err(Rejection::AlreadyReportedToWhistle(department));
                    }
                    ReportState::Missed => true,
                    ReportState::Pending => self.now > summons.report_by,
                };
                self.emit(IncidentEvent::WhistleReported {
                    by: actor,
                    department,
                    late,
                });
            }
            Action::DeadlineElapsed => {
                self.require_role(command, &[R::System])?;
                if self.state.status == S::Absent {
                    return Err(Rejection::NoSuchIncident);
                }
                self.deadlines_elapsed()?;
            }
        }
        Ok(())
    }

    /// When the acting department has a summons of the active whistle not yet reported,
    /// records its report (`WhistleReported`) in the same commit: used where the command is
    /// itself the department's answer to the case (acknowledging it, returning it).
    fn report_own_summons(&mut self, actor: Actor) {
        if let Role::Department(department) = self.role()
            && self.state.whistle.is_some()
            && let Some(summons) = self.state.summons(department)
            && summons.state != ReportState::Reported
        {
            let late = summons.state == ReportState::Missed || self.now > summons.report_by;
            self.emit(IncidentEvent::WhistleReported {
                by: actor,
                department,
                late,
            });
        }
    }

    fn dispatch(&mut self, to: Option<Handler>) -> Result<(), Rejection> {
        use Role as R;
        use Status as S;
        let command = "dispatch";
        let reassign = matches!(self.state.status, S::Dispatched | S::Acknowledged);
        if reassign {
            self.require_role(command, &[R::Street, R::District, R::City])?;
            self.require_whistle_level(command)?;
        } else {
            self.require_status(command, &[S::Filed])?;
            self.require_role(
                command,
                &[R::System, R::Community, R::Street, R::District, R::City],
            )?;
        }
        let (route, table_source) = self.route()?;
        let (handler, source) = match to {
            None if reassign => {
                return Err(Rejection::InvalidTransition {
                    command,
                    status: self.state.status,
                });
            }
            None => (Handler::from_route(&route), table_source),
            Some(handler) => {
                if !matches!(self.role(), R::Street | R::District | R::City) {
                    return Err(Rejection::Forbidden {
                        command,
                        role: self.role(),
                    });
                }
                if let Handler::Department(d) = handler
                    && self.policy.routing.department(d).is_none()
                {
                    return Err(Rejection::UnknownDepartment(d));
                }
                (handler, RouteSource::Manual)
            }
        };
        if reassign && self.state.handler == Some(handler) {
            return Err(Rejection::SameHandler(handler));
        }
        let (response_due, resolution_due) = self.deadlines(&route);
        let outgoing = self.state.handler.filter(|_| reassign);
        self.emit(IncidentEvent::Dispatched {
            by: self.actor,
            handler,
            source,
            clock: route.clock,
            response_due,
            resolution_due,
        });
        // The department the case is taken from is no longer answerable to the whistle for
        // it: a summons it has not answered is withdrawn (one it answered or missed stays on
        // the record).
        if let Some(Handler::Department(department)) = outgoing
            && self
                .state
                .summons(department)
                .is_some_and(|s| s.state == ReportState::Pending)
        {
            self.emit(IncidentEvent::WhistleSummonsWithdrawn {
                by: self.actor,
                department,
            });
        }
        if self.state.emergency && !self.state.emergency_whistled {
            // An emergency whistle is blown at once (应急哨), by the street (属地).
            self.whistle(
                WhistleKind::Emergency,
                Level::Street,
                WhistleCause::Emergency,
                route.summon.clone(),
                None,
            )?;
        }
        Ok(())
    }

    fn reopen(&mut self, reason: String) -> Result<(), Rejection> {
        let (route, _) = self.route()?;
        let (response_due, resolution_due) = self.deadlines(&route);
        self.emit(IncidentEvent::Reopened {
            by: self.actor,
            reason,
            response_due,
            resolution_due,
        });
        Ok(())
    }

    /// Blows a whistle, or escalates the active one, for `cause`. Every caller has already
    /// recorded the cause (a missed deadline, a declaration, an emergency category).
    fn whistle(
        &mut self,
        kind: WhistleKind,
        level: Level,
        cause: WhistleCause,
        departments: Vec<DepartmentId>,
        resolution_due: Option<Timestamp>,
    ) -> Result<(), Rejection> {
        match self.state.whistle.clone() {
            None => {
                let summoned = self.summon(kind, departments);
                self.emit(IncidentEvent::WhistleBlown {
                    kind,
                    level,
                    cause,
                    summoned,
                    resolution_due,
                });
                Ok(())
            }
            Some(active) => {
                let to = active.level.up().ok_or(Rejection::TopOfLadder)?;
                // Once a whistle has had to go up, it is a hard case (攻坚哨), unless an emergency.
                let kind =
                    if active.kind == WhistleKind::Emergency || kind == WhistleKind::Emergency {
                        WhistleKind::Emergency
                    } else {
                        WhistleKind::Tough
                    };
                let summoned = self.summon(kind, departments);
                self.emit(IncidentEvent::WhistleEscalated {
                    kind,
                    from: active.level,
                    to,
                    cause,
                    summoned,
                    resolution_due,
                });
                Ok(())
            }
        }
    }

    fn deadlines_elapsed(&mut self) -> Result<(), Rejection> {
        let now = self.now;
        if next_deadline(&self.state).is_none_or(|t| t > now) {
            return Err(Rejection::NothingDue {
                next: next_deadline(&self.state),
            });
        }
        for _ in 0..DUE_ITEMS_MAX {
            // In time order; at one instant, missed reports first: an escalation for a missed
            // response or resolution re-summons the departments, and would otherwise replace a
            // summons whose report fell due at that same instant before its miss was recorded.
            let Some(item) = due_items(&self.state)
                .filter(|i| i.at() <= now)
                .min_by_key(|i| (i.at(), !matches!(i, DueItem::Report(..))))
            else {
                break;
            };
            let handler = self.state.handler.unwrap_or(Handler::Street);
            let (route, _) = self.route()?;
            let kind = if self.state.emergency {
                WhistleKind::Emergency
            } else {
                WhistleKind::Routine
            };
            let top = self
                .state
                .whistle
                .as_ref()
                .is_some_and(|w| w.level.up().is_none());
            match item {
                DueItem::Response(due) => {
                    self.emit(IncidentEvent::DeadlineMissed {
                        handler,
                        deadline: DeadlineKind::Response,
                        due,
                    });
                    let departments = match handler {
                        Handler::Department(d) => vec![d],
                        _ => route.summon.clone(),
                    };
                    if !top {
                        let cause = WhistleCause::DeadlineMissed(DeadlineKind::Response);
                        self.whistle(
                            kind,
                            handler.first_whistle_level(),
                            cause,
                            departments,
                            None,
                        )?;
                    }
                }
                DueItem::Resolution(due) => {
                    self.emit(IncidentEvent::DeadlineMissed {
                        handler,
                        deadline: DeadlineKind::Resolution,
                        due,
                    });
                    if !top {
                        let fresh =
                            self.policy
                                .calendar
                                .add(now, route.resolution_minutes, route.clock);
                        let cause = WhistleCause::DeadlineMissed(DeadlineKind::Resolution);
                        let departments = route.summon.clone();
                        self.whistle(
                            kind,
                            handler.first_whistle_level(),
                            cause,
                            departments,
                            Some(fresh),
                        )?;
                    }
                }
                DueItem::Report(_, due) => {
                    // Every department whose report fell due at this instant is recorded, then
                    // one escalation re-summons them all a rung higher. A report due later is
                    // taken in its turn: an escalation before it (at an on-time shell, too)
                    // may re-summon the department first, and then it was never missed.
                    let missed: Vec<(DepartmentId, Timestamp)> = self
                        .state
                        .whistle
                        .iter()
                        .flat_map(|w| w.summons.iter())
                        .filter(|s| s.state == ReportState::Pending && s.report_by <= due)
                        .map(|s| (s.department, s.report_by))
                        .collect();
                    for (department, due) in &missed {
                        self.emit(IncidentEvent::WhistleReportMissed {
                            department: *department,
                            due: *due,
                        });
                    }
                    if !top {
                        let departments = missed.into_iter().map(|(d, _)| d).collect();
                        self.whistle(
                            kind,
                            Level::Street,
                            WhistleCause::ReportsMissed,
                            departments,
                            None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}
