//! The public JSON of the read models: KV values (under [`crate::keys`]) and the query API
//! (`projection.query.<model>`). JSON Schemas are generated from these types ([`schemas`]) and
//! checked for drift by `tests/schemas.rs`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Query subjects: `projection.query.<model>` (queue group [`QUEUE_GROUP`]).
pub const SUBJECT_QUERY_PREFIX: &str = "projection.query.";
/// Every query subject.
pub const SUBJECT_QUERY_ALL: &str = "projection.query.*";
pub const SUBJECT_QUERY_INCIDENT: &str = "projection.query.incident";
pub const SUBJECT_QUERY_BOARD: &str = "projection.query.board";
pub const SUBJECT_QUERY_AREA: &str = "projection.query.area";
pub const SUBJECT_QUERY_SCORECARDS: &str = "projection.query.scorecards";
pub const SUBJECT_QUERY_TOTALS: &str = "projection.query.totals";
pub const SUBJECT_QUERY_COMPLIANCE: &str = "projection.query.compliance";
pub const SUBJECT_QUERY_CHECKPOINT: &str = "projection.query.checkpoint";
/// Queue group of every projection instance's query subscription.
pub const QUEUE_GROUP: &str = "projection";

/// A deadline and whether it was recorded missed (`DeadlineMissed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DueView {
    /// RFC 3339 UTC.
    pub at: String,
    pub at_ms: i64,
    pub missed: bool,
}

/// One department summoned by the active whistle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SummonsView {
    pub department: String,
    pub report_by: String,
    /// `pending`, `reported` or `missed`.
    pub state: String,
}

/// The active whistle (吹哨).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WhistleView {
    /// `routine` (日常), `tough` (攻坚) or `emergency` (应急).
    pub kind: String,
    /// `grid`, `community`, `street`, `district` or `city`.
    pub level: String,
    /// `emergency`, `response_deadline_missed`, `resolution_deadline_missed`,
    /// `beyond_powers` or `reports_missed`.
    pub cause: String,
    pub summons: Vec<SummonsView>,
}

/// One commit in an incident's history summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryEntry {
    /// INCIDENTS stream sequence of the commit.
    pub sequence: u64,
    /// Aggregate version after the commit.
    pub version: u64,
    /// When the decision was made (the commit's occurred-at), RFC 3339 UTC.
    pub at: String,
    pub at_ms: i64,
    /// The commit's actor, e.g. `system:dispatch/dispatch-1`.
    pub actor: String,
    /// Event types of the commit, in order.
    pub events: Vec<String>,
}

/// Incident view: `incident.<incident_id>` and `projection.query.incident`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IncidentView {
    pub incident_id: String,
    /// INCIDENTS stream sequence of the last commit this view reflects.
    pub sequence: u64,
    /// Aggregate version of that commit.
    pub version: u64,
    /// `reported`, `filed`, `dispatched`, `acknowledged`, `resolved`, `closed`, `rejected`,
    /// `cancelled`, `parked` or `merged`.
    pub status: String,
    pub open: bool,
    pub grid: Option<String>,
    pub community: Option<String>,
    pub street: Option<String>,
    pub category: Option<String>,
    pub emergency: bool,
    /// `grid_worker`, `community`, `street` or `department:<id>`.
    pub handler: Option<String>,
    pub response_due: Option<DueView>,
    pub resolution_due: Option<DueView>,
    pub whistle: Option<WhistleView>,
    /// Whistles blown and escalations, over the incident's life.
    pub whistles_blown: u32,
    pub whistle_escalations: u32,
    /// Handlers that returned the case as "not ours", in order.
    pub returned_by: Vec<String>,
    pub reopens: u32,
    pub extensions_granted: u32,
    /// `satisfied`, `basically_satisfied` or `unsatisfied`.
    pub rating: Option<String>,
    pub reported_at: Option<String>,
    pub updated_at: String,
    /// Commits folded in (the history below keeps only the last ones).
    pub commits: u64,
    /// The last commits, oldest first (at most `HISTORY_ENTRIES_MAX`).
    pub history: Vec<HistoryEntry>,
}

/// One open case on a department's board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BoardEntry {
    pub incident_id: String,
    pub status: String,
    /// `handler` (the case is assigned to the department) or `summoned` (a whistle summoned
    /// it and it has not reported yet).
    pub role: String,
    pub category: Option<String>,
    pub grid: Option<String>,
    pub emergency: bool,
    /// Level of the active whistle, if any.
    pub whistle_level: Option<String>,
    /// A deadline of the case was recorded missed.
    pub overdue: bool,
    /// The earliest open deadline (response, resolution or report-by), RFC 3339 UTC.
    pub next_due: Option<String>,
}

/// Department board: `board.<department>` and `projection.query.board`. Open cases ordered by
/// urgency: emergencies first, then by whistle level, overdue cases, the earliest deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DepartmentBoard {
    pub department: String,
    /// INCIDENTS stream sequence this board reflects.
    pub sequence: u64,
    /// Open cases in all (the entries are the most urgent `BOARD_ENTRIES_MAX`).
    pub open: u64,
    pub entries: Vec<BoardEntry>,
}

/// Counters of the evaluation (响应率、解决率、满意率) inputs, from the event log (see the
/// table in `domain::incident`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Tally {
    /// Assignments: `Dispatched`, `Returned.rerouted_to`, `Reopened`, `Unparked`.
    pub assignments: u64,
    /// `Acknowledged { late: false }` / `{ late: true }`.
    pub responded_on_time: u64,
    pub responded_late: u64,
    /// `DeadlineMissed { deadline: Response }` against this handler.
    pub response_missed: u64,
    /// `Resolved { late: false }` followed by `Verified` / the same with `late: true`.
    pub resolved_on_time: u64,
    pub resolved_late: u64,
    /// `DeadlineMissed { deadline: Resolution }` against this handler.
    pub resolution_missed: u64,
    /// `VerificationFailed` after this handler's resolution.
    pub verification_failed: u64,
    /// `Returned` by this handler ("not ours").
    pub returns: u64,
    /// `Rated` while this handler held the case / of those, satisfied or basically satisfied.
    pub rated: u64,
    pub satisfied: u64,
    /// Whistle summons of this department / reported on time, late, missed.
    pub summoned: u64,
    pub reported_on_time: u64,
    pub reported_late: u64,
    pub reports_missed: u64,
}

/// Weights of the three rates in a score. No seed policy document gives figures (Sanming's
/// text only says 好差评 results feed the annual evaluation), so the default is equal weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScoreWeights {
    pub response: f64,
    pub resolution: f64,
    pub satisfaction: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights {
            response: 1.0,
            resolution: 1.0,
            satisfaction: 1.0,
        }
    }
}

/// A department's or a street's evaluation: `scorecard.department.<id>`,
/// `scorecard.street.<code>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Scorecard {
    /// `department` or `street`.
    pub kind: String,
    /// Department id or 9-digit street code.
    pub id: String,
    /// INCIDENTS stream sequence this scorecard reflects.
    pub sequence: u64,
    pub tally: Tally,
    /// 响应率: responded on time / assignments (`None` without assignments).
    pub response_rate: Option<f64>,
    /// 解决率: resolved on time and verified / assignments.
    pub resolution_rate: Option<f64>,
    /// 满意率: satisfied or basically satisfied / rated.
    pub satisfaction_rate: Option<f64>,
    /// Weighted mean of the rates that have a denominator (weights renormalised over them).
    pub score: Option<f64>,
    pub weights: ScoreWeights,
}

/// Statistics of a grid, community or street: `area.<level>.<code>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AreaStats {
    /// `grid` (15 digits), `community` (12) or `street` (9).
    pub level: String,
    pub code: String,
    /// INCIDENTS stream sequence these figures reflect.
    pub sequence: u64,
    /// Incidents filed in the area.
    pub incidents: u64,
    pub open: u64,
    pub by_status: BTreeMap<String, u64>,
    pub whistles_blown: u64,
    pub whistle_escalations: u64,
    pub tally: Tally,
}

/// Whistles of one kind at one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WhistleCount {
    pub kind: String,
    pub level: String,
    /// Whistles blown at this level / escalated to it.
    pub blown: u64,
    pub escalated: u64,
}

/// Deadline compliance over all handlers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeadlineCompliance {
    pub response_on_time: u64,
    pub response_late: u64,
    pub response_missed: u64,
    pub resolution_on_time: u64,
    pub resolution_late: u64,
    pub resolution_missed: u64,
    pub reports_on_time: u64,
    pub reports_late: u64,
    pub reports_missed: u64,
}

/// City-wide figures: `totals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Totals {
    pub sequence: u64,
    pub incidents: u64,
    pub open: u64,
    pub by_status: BTreeMap<String, u64>,
    /// By kind, then level (ladder order).
    pub whistles: Vec<WhistleCount>,
    pub deadlines: DeadlineCompliance,
    pub tally: Tally,
}

/// One standards rule's outcome for a community.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComplianceFinding {
    pub rule_id: String,
    pub title: String,
    /// `met`, `not_met`, `unknown` or `not_applicable`.
    pub status: String,
    pub actual: Option<f64>,
    /// What the rule requires, with how it was derived.
    pub required: Option<String>,
    pub unit: String,
    /// Seed document the rule cites.
    pub source: String,
}

/// Community standards compliance, from the GRIDS stream: `compliance.<community_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommunityCompliance {
    pub community_id: String,
    /// GRIDS stream sequence of the community's last commit reflected.
    pub sequence: u64,
    pub code: String,
    pub name: String,
    pub street: String,
    pub district: String,
    pub buildings: u64,
    pub households: u64,
    pub population: Option<u64>,
    pub grids: u64,
    pub grid_workers: u64,
    /// Standards profile (city) evaluated.
    pub city: String,
    pub met: u32,
    pub not_met: u32,
    pub unknown: u32,
    pub not_applicable: u32,
    pub findings: Vec<ComplianceFinding>,
}

/// Where a generation of the read models stands: `checkpoint`. Written after every flush,
/// after the values it covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Checkpoint {
    pub generation: u64,
    /// Every INCIDENTS commit up to this sequence is reflected.
    pub incidents_sequence: u64,
    /// Every GRIDS commit up to this sequence is reflected.
    pub grids_sequence: u64,
    /// When it was written, UTC milliseconds.
    pub written_at_ms: i64,
}

/// `projection.query.incident`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentQuery {
    pub incident_id: String,
}

/// `projection.query.board`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BoardQuery {
    pub department: String,
}

/// `projection.query.area`: one area by code, or the areas of a level when `code` is absent,
/// by code, a page at a time (`after`, `limit`; see [`QueryReply::Found`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AreaQuery {
    pub level: crate::fold::AreaLevel,
    #[serde(default)]
    pub code: Option<String>,
    /// List only the areas whose code sorts after this one (the `next_after` of the page
    /// before).
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many areas (default and largest: 5,000).
    #[serde(default)]
    #[schemars(range(min = 1, max = 5000))]
    pub limit: Option<u32>,
}

/// Whose scorecards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScorecardKind {
    Department,
    Street,
}

impl ScorecardKind {
    pub fn name(self) -> &'static str {
        match self {
            ScorecardKind::Department => "department",
            ScorecardKind::Street => "street",
        }
    }
}

/// `projection.query.scorecards`: one scorecard by id, or those of a kind, by id, a page at
/// a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScorecardQuery {
    pub kind: ScorecardKind,
    #[serde(default)]
    pub id: Option<String>,
    /// List only the scorecards whose id sorts after this one.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many scorecards (default and largest: 5,000).
    #[serde(default)]
    #[schemars(range(min = 1, max = 5000))]
    pub limit: Option<u32>,
}

/// `projection.query.compliance`: one community, or every community when absent, by id, a
/// page at a time.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComplianceQuery {
    #[serde(default)]
    pub community_id: Option<String>,
    /// List only the communities whose id sorts after this one.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many communities (default and largest: 5,000).
    #[serde(default)]
    #[schemars(range(min = 1, max = 5000))]
    pub limit: Option<u32>,
}

/// The body of `projection.query.totals` and `projection.query.checkpoint`: `{}` (or empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// The answer to every query: what was found, in which generation, at which checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum QueryReply<T> {
    /// For a list query, `value` is one page in key order. `next_after` is present when
    /// more follow (the page reached its `limit`, or would not fit one answer): ask again
    /// with `"after"` set to it. A page's items are taken from one read of the generation.
    Found {
        generation: u64,
        checkpoint: Checkpoint,
        value: T,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_after: Option<String>,
    },
    NotFound {
        generation: u64,
        checkpoint: Checkpoint,
    },
    /// The query cannot be answered as asked: `malformed_json` (not JSON),
    /// `schema_violation` (not the query's shape), `payload_too_large`, or `unknown_model`
    /// (no such `projection.query.<model>`).
    Rejected {
        reason_code: String,
        message: String,
    },
    /// `store_unavailable`: the read models could not be read; ask again.
    Error {
        reason_code: String,
        message: String,
    },
}

/// Every public message with its schema file name (`schemas/<name>.schema.json`).
pub fn schemas() -> Vec<(&'static str, schemars::schema::RootSchema)> {
    use schemars::schema_for;
    vec![
        ("projection_incident_query", schema_for!(IncidentQuery)),
        (
            "projection_incident_reply",
            schema_for!(QueryReply<IncidentView>),
        ),
        ("projection_board_query", schema_for!(BoardQuery)),
        (
            "projection_board_reply",
            schema_for!(QueryReply<DepartmentBoard>),
        ),
        ("projection_area_query", schema_for!(AreaQuery)),
        (
            "projection_area_reply",
            schema_for!(QueryReply<Vec<AreaStats>>),
        ),
        ("projection_scorecard_query", schema_for!(ScorecardQuery)),
        (
            "projection_scorecard_reply",
            schema_for!(QueryReply<Vec<Scorecard>>),
        ),
        ("projection_no_query", schema_for!(NoQuery)),
        ("projection_totals_reply", schema_for!(QueryReply<Totals>)),
        ("projection_compliance_query", schema_for!(ComplianceQuery)),
        (
            "projection_compliance_reply",
            schema_for!(QueryReply<Vec<CommunityCompliance>>),
        ),
        (
            "projection_checkpoint_reply",
            schema_for!(QueryReply<Checkpoint>),
        ),
    ]
}
