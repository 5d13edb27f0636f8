//! The pure core of the projection: folds INCIDENTS and GRIDS commits into read models.
//!
//! Every aggregate read model (totals, areas, scorecards, boards) is a **sum of per-incident
//! contributions**, and each incident's contribution is a function of its fold state
//! ([`Held`]) alone. So:
//! - a commit subtracts the incident's old contribution, folds the events, adds the new one;
//! - after a restart the aggregates are recomputed from the incident states loaded from KV,
//!   never from aggregate values that a crash may have left half-written: nothing can be
//!   counted twice;
//! - a rebuild folds incidents only and sums the aggregates once at the end.
//!
//! No IO, no clock: times come from the commits' occurred-at headers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use domain::incident::{
    DeadlineKind, Handler, IncidentEvent, Level, ReportState, Satisfaction, Status, WhistleCause,
};
use domain::routing::WhistleKind;
use domain::{DepartmentId, GridCode, IncidentId, IncidentState, StreetCode, Timestamp};
use eventstore::RecordedCommit;
use serde::{Deserialize, Serialize};

use crate::wire::{
    AreaStats, BoardEntry, CommunityCompliance, ComplianceFinding, DeadlineCompliance,
    DepartmentBoard, DueView, HistoryEntry, IncidentView, ScoreWeights, Scorecard, SummonsView,
    Tally, Totals, WhistleCount, WhistleView,
};

/// Commits kept in an incident's history summary (the full history is in the stream).
pub const HISTORY_ENTRIES_MAX: usize = 8;
/// Handlers tracked per incident for scorecards; tallies for further handlers are dropped
/// and counted in [`Held::tallies_dropped`] (the domain's bounds keep real cases far below).
pub const HANDLERS_TRACKED_MAX: usize = 16;
/// Most urgent cases listed on a department board.
pub const BOARD_ENTRIES_MAX: usize = 100;

/// Where a case stands on a board: smaller is more urgent (emergencies, then the higher
/// whistle level, then overdue, then the earliest open deadline). See [`Held::urgency`].
type Urgency = (bool, std::cmp::Reverse<Option<Level>>, bool, i64);

/// Longest actor text kept in a history entry, in bytes.
pub const ACTOR_BYTES_MAX: usize = 96;

const STATUSES: [Status; 10] = [
    Status::Reported,
    Status::Filed,
    Status::Dispatched,
    Status::Acknowledged,
    Status::Resolved,
    Status::Closed,
    Status::Rejected,
    Status::Cancelled,
    Status::Parked,
    Status::Merged,
];
const KINDS: [WhistleKind; 3] = WhistleKind::ALL;
const LEVELS: [Level; 5] = [
    Level::Grid,
    Level::Community,
    Level::Street,
    Level::District,
    Level::City,
];

fn status_index(status: Status) -> Option<usize> {
    STATUSES.iter().position(|s| *s == status)
}

pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Grid => "grid",
        Level::Community => "community",
        Level::Street => "street",
        Level::District => "district",
        Level::City => "city",
    }
}

fn cause_name(cause: WhistleCause) -> &'static str {
    match cause {
        WhistleCause::Emergency => "emergency",
        WhistleCause::DeadlineMissed(DeadlineKind::Response) => "response_deadline_missed",
        WhistleCause::DeadlineMissed(DeadlineKind::Resolution) => "resolution_deadline_missed",
        WhistleCause::BeyondPowers => "beyond_powers",
        WhistleCause::ReportsMissed => "reports_missed",
    }
}

fn satisfaction_name(satisfaction: Satisfaction) -> &'static str {
    match satisfaction {
        Satisfaction::Satisfied => "satisfied",
        Satisfaction::BasicallySatisfied => "basically_satisfied",
        Satisfaction::Unsatisfied => "unsatisfied",
    }
}

/// The event type name of an incident event (snake case, as in history entries): the stored
/// type name (`domain::encoding::event_type`) without its `incident.` prefix.
pub fn event_name(event: &IncidentEvent) -> &'static str {
    let stored = domain::encoding::event_type(event);
    stored.strip_prefix("incident.").unwrap_or(stored)
}

fn rfc3339(ms: i64) -> String {
    Timestamp(ms).to_string()
}

fn due_view(due: Option<domain::incident::Due>) -> Option<DueView> {
    due.map(|due| DueView {
        at: rfc3339(due.at.0),
        at_ms: due.at.0,
        missed: due.missed,
    })
}

/// Which incident an aggregate id names: the UUID after the last `.` (hyphenated or simple).
pub fn incident_of_aggregate(aggregate: &str) -> Option<IncidentId> {
    let tail = aggregate.rsplit('.').next().unwrap_or(aggregate);
    uuid::Uuid::parse_str(tail).ok().map(IncidentId)
}

/// A commit in an incident's history summary (compact; rendered as [`HistoryEntry`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCommit {
    pub sequence: u64,
    pub version: u64,
    pub at_ms: i64,
    pub actor: String,
    /// Event type names, comma-separated.
    pub events: String,
}

/// Whistles of one kind at one level over an incident's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhistleTally {
    pub kind: WhistleKind,
    pub level: Level,
    pub blown: u32,
    pub escalated: u32,
}

/// The fold state of one incident: the domain state plus what the read models need. Stored
/// (JSON) beside the public view under `incident.<id>` so a restart resumes from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub incident: IncidentId,
    /// Stream sequence and aggregate version of the last commit folded in.
    pub sequence: u64,
    pub version: u64,
    pub state: IncidentState,
    /// Evaluation counters per handler (and per summoned department).
    pub tallies: Vec<(Handler, Tally)>,
    pub tallies_dropped: u64,
    pub whistles: Vec<WhistleTally>,
    /// A resolution awaiting verification: who resolved it, and whether late.
    pub resolution_pending: Option<(Handler, bool)>,
    pub reported_at_ms: Option<i64>,
    pub updated_at_ms: i64,
    pub commits: u64,
    /// Not stored in the fold part of the KV value: the view carries it
    /// ([`StoredIncident::into_held`] restores it).
    #[serde(skip)]
    pub history: VecDeque<HeldCommit>,
}

impl Held {
    fn new(incident: IncidentId) -> Held {
        Held {
            incident,
            sequence: 0,
            version: 0,
            state: IncidentState::default(),
            tallies: Vec::new(),
            tallies_dropped: 0,
            whistles: Vec::new(),
            resolution_pending: None,
            reported_at_ms: None,
            updated_at_ms: 0,
            commits: 0,
            history: VecDeque::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.state.status != Status::Absent && !self.state.is_terminal()
    }

    fn tally(&mut self, handler: Handler) -> Option<&mut Tally> {
        let at = match self.tallies.iter().position(|(h, _)| *h == handler) {
            Some(at) => at,
            None if self.tallies.len() < HANDLERS_TRACKED_MAX => {
                self.tallies.push((handler, Tally::default()));
                self.tallies.len() - 1
            }
            None => {
                self.tallies_dropped += 1;
                return None;
            }
        };
        Some(&mut self.tallies[at].1)
    }

    fn count(&mut self, handler: Handler, field: impl FnOnce(&mut Tally) -> &mut u64) {
        if let Some(tally) = self.tally(handler) {
            *field(tally) += 1;
        }
    }

    fn whistle(&mut self, kind: WhistleKind, level: Level, escalated: bool) {
        let at = match self
            .whistles
            .iter()
            .position(|w| w.kind == kind && w.level == level)
        {
            Some(at) => at,
            None => {
                // At most 3 kinds x 5 levels: bounded by the types.
                self.whistles.push(WhistleTally {
                    kind,
                    level,
                    blown: 0,
                    escalated: 0,
                });
                self.whistles.len() - 1
            }
        };
        if escalated {
            self.whistles[at].escalated += 1;
        } else {
            self.whistles[at].blown += 1;
        }
    }

    fn current_handler(&self) -> Handler {
        self.state.handler.unwrap_or(Handler::Street)
    }

    /// Folds one event: the evaluation counters first (they need the state before it).
    fn apply_event(&mut self, event: &IncidentEvent, at_ms: i64) {
        use IncidentEvent as E;
        match event {
            E::Reported { .. } => self.reported_at_ms = Some(at_ms),
            E::Dispatched { handler, .. } => self.count(*handler, |t| &mut t.assignments),
            E::Returned {
                handler,
                rerouted_to,
                ..
            } => {
                self.count(*handler, |t| &mut t.returns);
                self.count(*rerouted_to, |t| &mut t.assignments);
            }
            E::Reopened { .. } | E::Unparked { .. } => {
                self.count(self.current_handler(), |t| &mut t.assignments)
            }
            E::Acknowledged { late, .. } => {
                let late = *late;
                self.count(self.current_handler(), |t| {
                    if late {
                        &mut t.responded_late
                    } else {
                        &mut t.responded_on_time
                    }
                });
            }
            E::Resolved { late, .. } => {
                self.resolution_pending = Some((self.current_handler(), *late));
            }
            E::Verified { .. } => {
                if let Some((handler, late)) = self.resolution_pending.take() {
                    self.count(handler, |t| {
                        if late {
                            &mut t.resolved_late
                        } else {
                            &mut t.resolved_on_time
                        }
                    });
                }
            }
            E::VerificationFailed { .. } => {
                if let Some((handler, _)) = self.resolution_pending.take() {
                    self.count(handler, |t| &mut t.verification_failed);
                }
            }
            E::Rated { satisfaction, .. } => {
                let handler = self.current_handler();
                self.count(handler, |t| &mut t.rated);
                if matches!(
                    satisfaction,
                    Satisfaction::Satisfied | Satisfaction::BasicallySatisfied
                ) {
                    self.count(handler, |t| &mut t.satisfied);
                }
            }
            E::DeadlineMissed {
                handler, deadline, ..
            } => match deadline {
                DeadlineKind::Response => self.count(*handler, |t| &mut t.response_missed),
                DeadlineKind::Resolution => self.count(*handler, |t| &mut t.resolution_missed),
            },
            E::WhistleBlown {
                kind,
                level,
                summoned,
                ..
            } => {
                self.whistle(*kind, *level, false);
                for s in summoned {
                    self.count(Handler::Department(s.department), |t| &mut t.summoned);
                }
            }
            E::WhistleEscalated {
                kind, to, summoned, ..
            } => {
                self.whistle(*kind, *to, true);
                for s in summoned {
                    self.count(Handler::Department(s.department), |t| &mut t.summoned);
                }
            }
            E::WhistleReported {
                department, late, ..
            } => {
                let late = *late;
                self.count(Handler::Department(*department), |t| {
                    if late {
                        &mut t.reported_late
                    } else {
                        &mut t.reported_on_time
                    }
                });
            }
            E::WhistleReportMissed { department, .. } => {
                self.count(Handler::Department(*department), |t| &mut t.reports_missed)
            }
            _ => {}
        }
        self.state.apply(event);
    }

    /// Departments whose board lists this incident, and why (`handler` or `summoned`).
    fn board_roles(&self) -> Vec<(DepartmentId, &'static str)> {
        let mut roles = Vec::new();
        if !self.is_open() || self.state.status == Status::Parked {
            return roles;
        }
        if matches!(self.state.status, Status::Dispatched | Status::Acknowledged)
            && let Some(Handler::Department(department)) = self.state.handler
        {
            roles.push((department, "handler"));
        }
        if let Some(whistle) = &self.state.whistle {
            for summons in &whistle.summons {
                if summons.state == ReportState::Pending
                    && !roles.iter().any(|(d, _)| *d == summons.department)
                {
                    roles.push((summons.department, "summoned"));
                }
            }
        }
        roles
    }

    /// The earliest open deadline (response, resolution, pending reports).
    fn next_due(&self) -> Option<Timestamp> {
        let state = &self.state;
        let reports = state
            .whistle
            .iter()
            .flat_map(|w| w.summons.iter())
            .filter(|s| s.state == ReportState::Pending)
            .map(|s| s.report_by);
        state
            .response
            .iter()
            .chain(state.resolution.iter())
            .filter(|d| !d.missed)
            .map(|d| d.at)
            .chain(reports)
            .min()
    }

    fn overdue(&self) -> bool {
        let state = &self.state;
        state.response.is_some_and(|d| d.missed)
            || state.resolution.is_some_and(|d| d.missed)
            || state.resolution_missed
    }

    /// Urgency order on a board: smaller is more urgent.
    fn urgency(&self) -> Urgency {
        (
            !self.state.emergency,
            std::cmp::Reverse(self.state.whistle.as_ref().map(|w| w.level)),
            !self.overdue(),
            self.next_due().map_or(i64::MAX, |t| t.0),
        )
    }

    pub fn view(&self) -> IncidentView {
        let state = &self.state;
        IncidentView {
            incident_id: self.incident.to_string(),
            sequence: self.sequence,
            version: self.version,
            status: state.status.as_str().to_owned(),
            open: self.is_open(),
            grid: state.grid.map(|g| g.to_string()),
            community: state.grid.map(|g| format!("{:012}", g.community())),
            street: state.grid.map(|g| g.street().to_string()),
            category: state.category.map(|c| c.to_string()),
            emergency: state.emergency,
            handler: state.handler.map(|h| h.to_string()),
            response_due: due_view(state.response),
            resolution_due: due_view(state.resolution),
            whistle: state.whistle.as_ref().map(|w| WhistleView {
                kind: w.kind.name().to_owned(),
                level: level_name(w.level).to_owned(),
                cause: cause_name(w.cause).to_owned(),
                summons: w
                    .summons
                    .iter()
                    .map(|s| SummonsView {
                        department: s.department.to_string(),
                        report_by: rfc3339(s.report_by.0),
                        state: match s.state {
                            ReportState::Pending => "pending",
                            ReportState::Reported => "reported",
                            ReportState::Missed => "missed",
                        }
                        .to_owned(),
                    })
                    .collect(),
            }),
            whistles_blown: self.whistles.iter().map(|w| w.blown).sum(),
            whistle_escalations: self.whistles.iter().map(|w| w.escalated).sum(),
            returned_by: state.returned_by.iter().map(|h| h.to_string()).collect(),
            reopens: u32::from(state.reopens),
            extensions_granted: u32::from(state.extensions_granted),
            rating: state.rating.map(|r| satisfaction_name(r).to_owned()),
            reported_at: self.reported_at_ms.map(rfc3339),
            updated_at: rfc3339(self.updated_at_ms),
            commits: self.commits,
            history: self
                .history
                .iter()
                .map(|c| HistoryEntry {
                    sequence: c.sequence,
                    version: c.version,
                    at: rfc3339(c.at_ms),
                    at_ms: c.at_ms,
                    actor: c.actor.clone(),
                    events: c.events.split(',').map(str::to_owned).collect(),
                })
                .collect(),
        }
    }
}

/// What one incident value in KV holds: the public view and the fold state behind it
/// (less the history, which the view carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIncident {
    pub view: IncidentView,
    pub fold: Held,
}

impl StoredIncident {
    /// The fold state with its history restored from the view.
    pub fn into_held(self) -> Held {
        let mut held = self.fold;
        held.history = self
            .view
            .history
            .into_iter()
            .map(|entry| HeldCommit {
                sequence: entry.sequence,
                version: entry.version,
                at_ms: entry.at_ms,
                actor: entry.actor,
                events: entry.events.join(","),
            })
            .collect();
        held
    }
}

macro_rules! tally_fields {
    ($mac:ident) => {
        $mac!(
            assignments,
            responded_on_time,
            responded_late,
            response_missed,
            resolved_on_time,
            resolved_late,
            resolution_missed,
            verification_failed,
            returns,
            rated,
            satisfied,
            summoned,
            reported_on_time,
            reported_late,
            reports_missed
        )
    };
}

/// Adds (`sign` 1) or subtracts (-1) `other` into `into`.
fn add_tally(into: &mut Tally, other: &Tally, sign: i64) {
    macro_rules! add {
        ($($field:ident),*) => {
            $(into.$field = into.$field.saturating_add_signed(sign * other.$field as i64);)*
        };
    }
    tally_fields!(add);
}

fn add_u64(into: &mut u64, value: u64, sign: i64) {
    *into = into.saturating_add_signed(sign * value as i64);
}

/// Area levels of the statistics.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AreaLevel {
    Grid,
    Community,
    Street,
}

impl AreaLevel {
    pub fn name(self) -> &'static str {
        match self {
            AreaLevel::Grid => "grid",
            AreaLevel::Community => "community",
            AreaLevel::Street => "street",
        }
    }

    pub fn parse(name: &str) -> Option<AreaLevel> {
        match name {
            "grid" => Some(AreaLevel::Grid),
            "community" => Some(AreaLevel::Community),
            "street" => Some(AreaLevel::Street),
            _ => None,
        }
    }

    fn render(self, code: u64) -> String {
        match self {
            AreaLevel::Grid => format!("{code:015}"),
            AreaLevel::Community => format!("{code:012}"),
            AreaLevel::Street => format!("{code:09}"),
        }
    }

    fn codes(grid: GridCode) -> [(AreaLevel, u64); 3] {
        [
            (AreaLevel::Grid, grid.value()),
            (AreaLevel::Community, grid.community()),
            (AreaLevel::Street, u64::from(grid.street().value())),
        ]
    }
}

/// Counts of a set of incidents (the whole city or one area).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counts {
    incidents: u64,
    open: u64,
    by_status: [u64; STATUSES.len()],
    whistles_blown: u64,
    whistle_escalations: u64,
    /// Blown and escalated, by kind (x5) and level.
    whistle_matrix: [[u64; 2]; KINDS.len() * LEVELS.len()],
    tally: Tally,
}

fn matrix_index(kind: WhistleKind, level: Level) -> usize {
    let kind = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
    let level = LEVELS.iter().position(|l| *l == level).unwrap_or(0);
    kind * LEVELS.len() + level
}

impl Counts {
    fn add(&mut self, held: &Held, sign: i64) {
        add_u64(&mut self.incidents, 1, sign);
        add_u64(&mut self.open, u64::from(held.is_open()), sign);
        if let Some(at) = status_index(held.state.status) {
            add_u64(&mut self.by_status[at], 1, sign);
        }
        for whistle in &held.whistles {
            add_u64(&mut self.whistles_blown, u64::from(whistle.blown), sign);
            add_u64(
                &mut self.whistle_escalations,
                u64::from(whistle.escalated),
                sign,
            );
            let cell = &mut self.whistle_matrix[matrix_index(whistle.kind, whistle.level)];
            add_u64(&mut cell[0], u64::from(whistle.blown), sign);
            add_u64(&mut cell[1], u64::from(whistle.escalated), sign);
        }
        for (_, tally) in &held.tallies {
            add_tally(&mut self.tally, tally, sign);
        }
    }

    fn by_status(&self) -> BTreeMap<String, u64> {
        STATUSES
            .iter()
            .zip(self.by_status)
            .filter(|(_, count)| *count > 0)
            .map(|(status, count)| (status.as_str().to_owned(), count))
            .collect()
    }
}

/// A read model's key, for dirty tracking.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelKey {
    Totals,
    Area(AreaLevel, u64),
    Department(DepartmentId),
    Street(StreetCode),
    Board(DepartmentId),
    Compliance(String),
    Incident(IncidentId),
}

impl ModelKey {
    /// The KV key (see [`crate::keys`]).
    pub fn kv_key(&self) -> String {
        match self {
            ModelKey::Totals => crate::keys::TOTALS.to_owned(),
            ModelKey::Area(level, code) => crate::keys::area(level.name(), &level.render(*code)),
            ModelKey::Department(id) => crate::keys::scorecard("department", id.as_str()),
            ModelKey::Street(code) => crate::keys::scorecard("street", &code.to_string()),
            ModelKey::Board(id) => crate::keys::board(id.as_str()),
            ModelKey::Compliance(id) => crate::keys::compliance(id),
            ModelKey::Incident(id) => crate::keys::incident(&id.to_string()),
        }
    }
}

/// What [`Projector::apply_incident_commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    /// The incident's view already reflects this commit (a redelivery after a restart).
    AlreadyReflected,
    /// The aggregate id names no incident: skipped.
    Foreign,
    /// The commit does not follow the incident's last folded commit (`held_version`, 0 for
    /// an incident not seen yet): a commit in between never arrived. Nothing was folded; the
    /// caller reads the incident's history and hands it to [`Projector::replace_incident`].
    Gap {
        incident: IncidentId,
        held_version: u64,
    },
}

/// A registered community as the projection keeps it (GRIDS).
#[derive(Debug, Clone)]
struct HeldCommunity {
    community: registry::domain::Community,
    sequence: u64,
    version: u64,
}

/// KV values to write, in the order they must be written.
#[derive(Debug, Default)]
pub struct Rendered {
    /// Aggregates and compliance; written first.
    pub models: Vec<(String, bytes::Bytes)>,
    /// Incident values; written after the models.
    pub incidents: Vec<(String, bytes::Bytes)>,
}

impl Rendered {
    pub fn len(&self) -> usize {
        self.models.len() + self.incidents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every read model, in memory.
#[derive(Debug)]
pub struct Projector {
    weights: ScoreWeights,
    profile: Option<standards::Profile>,
    /// Keep aggregates current on every commit (live) or sum them at the end (rebuild).
    incremental: bool,
    incidents: HashMap<IncidentId, Held>,
    totals: Counts,
    areas: HashMap<(AreaLevel, u64), Counts>,
    departments: HashMap<DepartmentId, Tally>,
    streets: HashMap<StreetCode, Tally>,
    /// Each department's open cases, most urgent first (the order its board lists them).
    boards: HashMap<DepartmentId, BTreeSet<(Urgency, IncidentId)>>,
    communities: BTreeMap<String, HeldCommunity>,
    incidents_sequence: u64,
    grids_sequence: u64,
    dirty: HashSet<ModelKey>,
    dirty_incidents: HashSet<IncidentId>,
}

impl Projector {
    /// `profile`: the standards profile for community compliance (`None`: not evaluated).
    pub fn new(
        weights: ScoreWeights,
        profile: Option<standards::Profile>,
        incremental: bool,
    ) -> Projector {
        Projector {
            weights,
            profile,
            incremental,
            incidents: HashMap::new(),
            totals: Counts::default(),
            areas: HashMap::new(),
            departments: HashMap::new(),
            streets: HashMap::new(),
            boards: HashMap::new(),
            communities: BTreeMap::new(),
            incidents_sequence: 0,
            grids_sequence: 0,
            dirty: HashSet::new(),
            dirty_incidents: HashSet::new(),
        }
    }

    pub fn incidents_sequence(&self) -> u64 {
        self.incidents_sequence
    }

    pub fn grids_sequence(&self) -> u64 {
        self.grids_sequence
    }

    /// Marks the INCIDENTS stream as read up to `sequence` (e.g. a checkpoint loaded from KV).
    pub fn note_incidents_sequence(&mut self, sequence: u64) {
        self.incidents_sequence = self.incidents_sequence.max(sequence);
    }

    pub fn incident(&self, incident: IncidentId) -> Option<&Held> {
        self.incidents.get(&incident)
    }

    pub fn incident_count(&self) -> usize {
        self.incidents.len()
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len() + self.dirty_incidents.len()
    }

    /// Adds (`sign` 1) or removes (-1) one incident's contribution to every aggregate.
    fn contribute(&mut self, held: &Held, sign: i64) {
        self.totals.add(held, sign);
        self.dirty.insert(ModelKey::Totals);
        if let Some(grid) = held.state.grid {
            for area in AreaLevel::codes(grid) {
                self.areas.entry(area).or_default().add(held, sign);
                self.dirty.insert(ModelKey::Area(area.0, area.1));
            }
            let street = self.streets.entry(grid.street()).or_default();
            for (_, tally) in &held.tallies {
                add_tally(street, tally, sign);
            }
            self.dirty.insert(ModelKey::Street(grid.street()));
        }
        for (handler, tally) in &held.tallies {
            if let Handler::Department(department) = handler {
                add_tally(
                    self.departments.entry(*department).or_default(),
                    tally,
                    sign,
                );
                // Every department with a scorecard has a board, empty or not, so a board
                // that empties is rewritten rather than left stale.
                self.boards.entry(*department).or_default();
                self.dirty.insert(ModelKey::Department(*department));
            }
        }
        for (department, _) in held.board_roles() {
            // A case is removed (sign -1) with the state it was added with (+1), so its
            // urgency, and with it the key, is the same.
            let members = self.boards.entry(department).or_default();
            let key = (held.urgency(), held.incident);
            if sign > 0 {
                members.insert(key);
            } else {
                let removed = members.remove(&key);
                debug_assert!(removed, "board {department} did not hold {}", held.incident);
            }
            self.dirty.insert(ModelKey::Board(department));
        }
    }

    /// Folds one INCIDENTS commit. A commit at or below the sequence the incident's view
    /// reflects is skipped: that is what makes redelivery after a crash harmless.
    pub fn apply_incident_commit(&mut self, commit: &RecordedCommit<IncidentEvent>) -> Applied {
        self.incidents_sequence = self.incidents_sequence.max(commit.sequence);
        let reported = commit.events.iter().find_map(|e| match &e.event {
            IncidentEvent::Reported { incident, .. } => Some(*incident),
            _ => None,
        });
        let Some(incident) = incident_of_aggregate(commit.aggregate.as_str()).or(reported) else {
            return Applied::Foreign;
        };
        let mut held = match self.incidents.remove(&incident) {
            Some(held) if held.sequence >= commit.sequence => {
                self.incidents.insert(incident, held);
                return Applied::AlreadyReflected;
            }
            Some(held) if commit.first_version != held.version + 1 => {
                let held_version = held.version;
                self.incidents.insert(incident, held);
                return Applied::Gap {
                    incident,
                    held_version,
                };
            }
            Some(held) => held,
            None if commit.first_version != 1 => {
                return Applied::Gap {
                    incident,
                    held_version: 0,
                };
            }
            None => Held::new(incident),
        };
        if self.incremental && held.sequence > 0 {
            self.contribute(&held, -1);
        }
        let at_ms = commit.meta.occurred_at_ms;
        let mut names = String::new();
        for recorded in &commit.events {
            if !names.is_empty() {
                names.push(',');
            }
            names.push_str(event_name(&recorded.event));
            held.apply_event(&recorded.event, at_ms);
        }
        held.sequence = commit.sequence;
        held.version = commit.version;
        held.updated_at_ms = at_ms;
        held.commits += 1;
        if held.history.len() >= HISTORY_ENTRIES_MAX {
            held.history.pop_front();
        }
        let mut actor = commit.meta.actor.clone();
        if actor.len() > ACTOR_BYTES_MAX {
            let mut cut = ACTOR_BYTES_MAX;
            while !actor.is_char_boundary(cut) {
                cut -= 1;
            }
            actor.truncate(cut);
        }
        held.history.push_back(HeldCommit {
            sequence: commit.sequence,
            version: commit.version,
            at_ms,
            actor,
            events: names,
        });
        if self.incremental {
            self.contribute(&held, 1);
        }
        self.dirty_incidents.insert(incident);
        self.incidents.insert(incident, held);
        Applied::New
    }

    /// Folds an incident afresh from its whole stored history (after [`Applied::Gap`]),
    /// replacing what was held for it. The history may run past the commits delivered so
    /// far; those later commits are skipped when they arrive. The checkpoint does not move:
    /// it says how far the *stream* was followed, and other incidents' commits before the
    /// history's end may still be on their way.
    ///
    /// Returns the commits of `history` that did not fold (sequence, and why), for the
    /// caller to log and count. A valid history folds whole; one that does not (a first
    /// commit without `Reported` under an aggregate that names no incident, versions that
    /// skip) is stored data the builder cannot change. It was an assertion, and the builder
    /// crashed on the same commit at every restart; now those commits are skipped and the
    /// rest of the history folds as far as it can.
    pub fn replace_incident(
        &mut self,
        incident: IncidentId,
        history: &[RecordedCommit<IncidentEvent>],
    ) -> Vec<(u64, Applied)> {
        if let Some(held) = self.incidents.remove(&incident)
            && self.incremental
            && held.sequence > 0
        {
            self.contribute(&held, -1);
        }
        let followed = self.incidents_sequence;
        let mut skipped = Vec::new();
        for commit in history {
            match self.apply_incident_commit(commit) {
                Applied::New => {}
                applied => skipped.push((commit.sequence, applied)),
            }
        }
        self.incidents_sequence = followed;
        self.dirty_incidents.insert(incident);
        skipped
    }

    /// Inserts an incident state loaded from KV (before following the stream).
    pub fn load_incident(&mut self, held: Held) {
        if self.incremental {
            self.contribute(&held, 1);
        }
        self.incidents.insert(held.incident, held);
    }

    /// Recomputes every aggregate from the incident states and marks them all dirty (after
    /// loading from KV, and at the end of a rebuild).
    pub fn recompute_aggregates(&mut self) {
        self.totals = Counts::default();
        self.areas.clear();
        self.departments.clear();
        self.streets.clear();
        self.boards.clear();
        let incidents = std::mem::take(&mut self.incidents);
        for held in incidents.values() {
            self.contribute(held, 1);
        }
        self.incidents = incidents;
        self.dirty.insert(ModelKey::Totals);
        let keys: Vec<ModelKey> = self
            .areas
            .keys()
            .map(|(level, code)| ModelKey::Area(*level, *code))
            .chain(self.departments.keys().map(|d| ModelKey::Department(*d)))
            .chain(self.boards.keys().map(|d| ModelKey::Board(*d)))
            .chain(self.streets.keys().map(|s| ModelKey::Street(*s)))
            .collect();
        self.dirty.extend(keys);
    }

    /// Folds one GRIDS commit (communities are small: every start replays GRIDS in full).
    pub fn apply_grids_commit(&mut self, commit: &RecordedCommit<registry::domain::Event>) {
        self.grids_sequence = self.grids_sequence.max(commit.sequence);
        let id = commit.aggregate.as_str();
        let held = self
            .communities
            .entry(id.to_owned())
            .or_insert_with(|| HeldCommunity {
                community: registry::domain::Community::new(id),
                sequence: 0,
                version: 0,
            });
        if commit.sequence <= held.sequence {
            return;
        }
        for recorded in &commit.events {
            registry::domain::evolve(&mut held.community, &recorded.event);
        }
        held.sequence = commit.sequence;
        held.version = commit.version;
        self.dirty.insert(ModelKey::Compliance(id.to_owned()));
    }

    /// The checkpoint of what is folded in.
    pub fn checkpoint(&self, generation: u64, written_at_ms: i64) -> crate::wire::Checkpoint {
        crate::wire::Checkpoint {
            generation,
            incidents_sequence: self.incidents_sequence,
            grids_sequence: self.grids_sequence,
            written_at_ms,
        }
    }

    /// Renders and clears what changed since the last call. With `incidents_only`, the
    /// aggregates stay dirty (a rebuild writes them once at the end).
    pub fn take_dirty(&mut self, incidents_only: bool) -> Rendered {
        let mut rendered = Rendered::default();
        if !incidents_only {
            let mut keys: Vec<ModelKey> = self.dirty.drain().collect();
            keys.sort();
            for key in keys {
                if let Some(value) = self.render(&key) {
                    rendered.models.push((key.kv_key(), value.into()));
                }
            }
        }
        let mut incidents: Vec<IncidentId> = self.dirty_incidents.drain().collect();
        incidents.sort();
        for incident in incidents {
            if let Some(held) = self.incidents.get(&incident) {
                let stored = StoredIncident {
                    view: held.view(),
                    fold: held.clone(),
                };
                rendered.incidents.push((
                    ModelKey::Incident(incident).kv_key(),
                    serde_json::to_vec(&stored)
                        .expect("incident values serialise")
                        .into(),
                ));
            }
        }
        rendered
    }

    /// Every model, rendered (tests compare KV contents against this).
    pub fn render_all(&self) -> BTreeMap<String, serde_json::Value> {
        let mut keys: Vec<ModelKey> = vec![ModelKey::Totals];
        keys.extend(self.areas.keys().map(|(l, c)| ModelKey::Area(*l, *c)));
        keys.extend(self.departments.keys().map(|d| ModelKey::Department(*d)));
        keys.extend(self.streets.keys().map(|s| ModelKey::Street(*s)));
        keys.extend(self.boards.keys().map(|d| ModelKey::Board(*d)));
        keys.extend(
            self.communities
                .keys()
                .map(|c| ModelKey::Compliance(c.clone())),
        );
        let mut out = BTreeMap::new();
        for key in keys {
            if let Some(value) = self.render(&key) {
                out.insert(
                    key.kv_key(),
                    serde_json::from_slice(&value).expect("rendered JSON"),
                );
            }
        }
        for (incident, held) in &self.incidents {
            out.insert(
                ModelKey::Incident(*incident).kv_key(),
                serde_json::to_value(held.view()).expect("view serialises"),
            );
        }
        out
    }

    pub fn totals(&self) -> Totals {
        let mut whistles = Vec::new();
        for kind in KINDS {
            for level in LEVELS {
                let [blown, escalated] = self.totals.whistle_matrix[matrix_index(kind, level)];
                if blown + escalated > 0 {
                    whistles.push(WhistleCount {
                        kind: kind.name().to_owned(),
                        level: level_name(level).to_owned(),
                        blown,
                        escalated,
                    });
                }
            }
        }
        let tally = self.totals.tally;
        Totals {
            sequence: self.incidents_sequence,
            incidents: self.totals.incidents,
            open: self.totals.open,
            by_status: self.totals.by_status(),
            whistles,
            deadlines: DeadlineCompliance {
                response_on_time: tally.responded_on_time,
                response_late: tally.responded_late,
                response_missed: tally.response_missed,
                resolution_on_time: tally.resolved_on_time,
                resolution_late: tally.resolved_late,
                resolution_missed: tally.resolution_missed,
                reports_on_time: tally.reported_on_time,
                reports_late: tally.reported_late,
                reports_missed: tally.reports_missed,
            },
            tally,
        }
    }

    fn scorecard(&self, kind: &str, id: String, tally: Tally) -> Scorecard {
        let rate = |numerator: u64, denominator: u64| {
            (denominator > 0).then(|| numerator as f64 / denominator as f64)
        };
        let response_rate = rate(tally.responded_on_time, tally.assignments);
        let resolution_rate = rate(tally.resolved_on_time, tally.assignments);
        let satisfaction_rate = rate(tally.satisfied, tally.rated);
        let weights = self.weights;
        let mut weighted = 0.0;
        let mut weight_sum = 0.0;
        for (rate, weight) in [
            (response_rate, weights.response),
            (resolution_rate, weights.resolution),
            (satisfaction_rate, weights.satisfaction),
        ] {
            if let Some(rate) = rate {
                weighted += rate * weight;
                weight_sum += weight;
            }
        }
        Scorecard {
            kind: kind.to_owned(),
            id,
            sequence: self.incidents_sequence,
            tally,
            response_rate,
            resolution_rate,
            satisfaction_rate,
            score: (weight_sum > 0.0).then(|| weighted / weight_sum),
            weights,
        }
    }

    fn board(&self, department: DepartmentId) -> DepartmentBoard {
        // The board is kept in urgency order as cases change (`contribute`): a flush renders
        // the most urgent entries without looking at the rest (sorting a board of thousands
        // of open cases on every flush was half of the builder's CPU at 1,000 reports/s).
        let members = self.boards.get(&department);
        let open = members.map_or(0, BTreeSet::len);
        let cases: Vec<&Held> = members
            .into_iter()
            .flatten()
            .take(BOARD_ENTRIES_MAX)
            .filter_map(|(_, id)| self.incidents.get(id))
            .collect();
        let entries = cases
            .iter()
            .map(|held| BoardEntry {
                incident_id: held.incident.to_string(),
                status: held.state.status.as_str().to_owned(),
                role: held
                    .board_roles()
                    .into_iter()
                    .find(|(d, _)| *d == department)
                    .map_or("handler", |(_, role)| role)
                    .to_owned(),
                category: held.state.category.map(|c| c.to_string()),
                grid: held.state.grid.map(|g| g.to_string()),
                emergency: held.state.emergency,
                whistle_level: held
                    .state
                    .whistle
                    .as_ref()
                    .map(|w| level_name(w.level).to_owned()),
                overdue: held.overdue(),
                next_due: held.next_due().map(|t| rfc3339(t.0)),
            })
            .collect();
        DepartmentBoard {
            department: department.to_string(),
            sequence: self.incidents_sequence,
            open: open as u64,
            entries,
        }
    }

    fn compliance(&self, community_id: &str) -> Option<CommunityCompliance> {
        let profile = self.profile.as_ref()?;
        let held = self.communities.get(community_id)?;
        held.community.profile.as_ref()?;
        let answer = registry::service::community_answer(&held.community, held.version, profile);
        let report = answer.compliance;
        Some(CommunityCompliance {
            community_id: answer.community_id,
            sequence: held.sequence,
            code: answer.code,
            name: answer.name,
            street: answer.street,
            district: answer.district,
            buildings: answer.buildings as u64,
            households: answer.households,
            population: answer.population,
            grids: answer.grids.len() as u64,
            grid_workers: answer.grid_workers as u64,
            city: report.city,
            met: report.summary.met,
            not_met: report.summary.not_met,
            unknown: report.summary.unknown,
            not_applicable: report.summary.not_applicable,
            findings: report
                .findings
                .into_iter()
                .map(|finding| ComplianceFinding {
                    rule_id: finding.rule_id,
                    title: finding.title,
                    status: match finding.status {
                        standards::Status::Met => "met",
                        standards::Status::NotMet => "not_met",
                        standards::Status::Unknown => "unknown",
                        standards::Status::NotApplicable => "not_applicable",
                    }
                    .to_owned(),
                    actual: finding.actual,
                    required: finding.required.map(|r| r.text),
                    unit: finding.unit,
                    source: finding.citation.file,
                })
                .collect(),
        })
    }

    /// The JSON value of one model key; `None` when it names nothing.
    pub fn render(&self, key: &ModelKey) -> Option<Vec<u8>> {
        let json = match key {
            ModelKey::Totals => serde_json::to_vec(&self.totals()),
            ModelKey::Area(level, code) => {
                let counts = self.areas.get(&(*level, *code))?;
                serde_json::to_vec(&AreaStats {
                    level: level.name().to_owned(),
                    code: level.render(*code),
                    sequence: self.incidents_sequence,
                    incidents: counts.incidents,
                    open: counts.open,
                    by_status: counts.by_status(),
                    whistles_blown: counts.whistles_blown,
                    whistle_escalations: counts.whistle_escalations,
                    tally: counts.tally,
                })
            }
            ModelKey::Department(id) => {
                let tally = *self.departments.get(id)?;
                serde_json::to_vec(&self.scorecard("department", id.to_string(), tally))
            }
            ModelKey::Street(code) => {
                let tally = *self.streets.get(code)?;
                serde_json::to_vec(&self.scorecard("street", code.to_string(), tally))
            }
            ModelKey::Board(id) => serde_json::to_vec(&self.board(*id)),
            ModelKey::Compliance(id) => serde_json::to_vec(&self.compliance(id)?),
            ModelKey::Incident(id) => serde_json::to_vec(&self.incidents.get(id)?.view()),
        };
        Some(json.expect("read models serialise"))
    }
}
