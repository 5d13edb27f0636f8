//! The pure intake core: what to do with one valid submission, given what intake knows (open
//! incidents, receipts already given, reporters' rate buckets) and `now`. No IO, no clock:
//! the shell passes the stream message's timestamp as `now`, so a redelivery decides the same.

use std::collections::{HashMap, VecDeque};

use domain::incident::{self, IncidentEvent, IncidentState, Position as DomainPosition, Status};
use domain::{Action, Rejection, Timestamp};
use domain::{Actor, ActorId, CategoryCode, GridCode, IncidentCommand, IncidentId, Policy, Role};
use eventstore::{Position, RecordedCommit};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::decode::{Place, Refusal, ValidSubmission};
use crate::wire::{Channel, ReasonCode, Receipt, SubmissionKind};

/// Default radius within which a report of the same category duplicates an open incident.
pub const DEDUP_RADIUS_M: f64 = 50.0;
/// Default time window (since the open incident was reported) for duplicate detection.
pub const DEDUP_WINDOW_MS: i64 = 72 * 3_600_000;
/// Default burst of submissions one reporter may send at once.
pub const RATE_BURST: u32 = 10;
/// Default time for one reporter token to refill (10 per hour sustained).
pub const RATE_REFILL_MS: i64 = 6 * 60_000;
/// Most reporters whose rate buckets are held. At the bound, full buckets (reporters who
/// could send a whole burst anyway) are dropped; if every bucket is still in use, all are
/// dropped, which resets every reporter's limit (a flood of new reporter ids then costs the
/// limit its memory, not the process its memory).
pub const REPORTERS_TRACKED_MAX: usize = 200_000;
/// Most receipts held in memory for resubmissions; older ones are looked up in the store.
pub const RECEIPTS_HELD_MAX: usize = 500_000;
/// Most merges remembered by the duplicate's incident id (see [`Core::plan`]): the newest
/// ones, which is where a submission redelivered after a crash finds its merge.
pub const MERGES_HELD_MAX: usize = 200_000;
/// How far after its arrival a report's `occurred_at` may lie (a phone whose clock runs
/// fast); later is refused `schema_violation`, never filed with a time to come.
pub const OCCURRED_AT_AHEAD_MAX_MS: i64 = 60 * 60_000;
/// Metres per degree of latitude (spherical Earth, good to 0.5 % for a 50 m radius).
const METRES_PER_DEGREE: f64 = 111_195.0;
/// Namespace of incident ids derived from submission ids (UUID v8 over SHA-256).
const INCIDENT_ID_DOMAIN: &[u8] = b"wangge/intake/incident/v1\0";

/// Tunables of the core, each with its named default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreConfig {
    pub dedup_radius_m: f64,
    pub dedup_window_ms: i64,
    pub rate_burst: u32,
    pub rate_refill_ms: i64,
    pub reporters_tracked_max: usize,
    pub receipts_held_max: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            dedup_radius_m: DEDUP_RADIUS_M,
            dedup_window_ms: DEDUP_WINDOW_MS,
            rate_burst: RATE_BURST,
            rate_refill_ms: RATE_REFILL_MS,
            reporters_tracked_max: REPORTERS_TRACKED_MAX,
            receipts_held_max: RECEIPTS_HELD_MAX,
        }
    }
}

/// The incident id a submission becomes: UUID v8 from SHA-256 of the submission id, so a
/// redelivered submission can never create a second incident.
pub fn incident_id_for(submission_id: &str) -> IncidentId {
    let digest = Sha256::new()
        .chain_update(INCIDENT_ID_DOMAIN)
        .chain_update(submission_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    IncidentId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// Event ids of a commit derived from its command id, so retries encode identical commits.
pub fn event_ids_for(command_id: &str, count: usize) -> Vec<uuid::Uuid> {
    (0..count)
        .map(|index| {
            let digest = Sha256::new()
                .chain_update(b"wangge/intake/event/v1\0")
                .chain_update(command_id.as_bytes())
                .chain_update((index as u32).to_be_bytes())
                .finalize();
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Builder::from_custom_bytes(bytes).into_uuid()
        })
        .collect()
}

/// What the grid registry says about a place.
#[derive(Debug, Clone, PartialEq)]
pub enum Located {
    Grid {
        grid: GridCode,
        /// The point (for duplicate detection).
        point: Option<(f64, f64)>,
    },
    /// Inside no community with grids.
    Outside,
    /// No grid holds a building of that id, or the id is ambiguous (the message says which).
    UnknownBuilding(String),
    Invalid(String),
}

/// Resolves places to grids (the registry's in-process `Locator` in the service).
pub trait Locate {
    fn locate(&self, place: &Place) -> Located;
}

impl Locate for registry::Locator {
    fn locate(&self, place: &Place) -> Located {
        let (answer, point) = match place {
            Place::Point { lon, lat } => (
                registry::Locator::locate(self, *lon, *lat),
                Some((*lon, *lat)),
            ),
            Place::Building(building_id) => match self.locate_building(building_id) {
                None => {
                    return Located::UnknownBuilding(format!(
                        "building {building_id:?} is in no grid of the grid registry"
                    ));
                }
                Some(registry::BuildingAnswer {
                    answer: registry::LocateAnswer::Rejected { message, .. },
                    ..
                }) => return Located::UnknownBuilding(message),
                Some(registry::BuildingAnswer { answer, position }) => {
                    (answer, position.map(|[lon, lat]| (lon, lat)))
                }
            },
        };
        match answer {
            registry::LocateAnswer::Served { grid_code, .. } => match grid_code.parse() {
                Ok(grid) => Located::Grid { grid, point },
                Err(error) => Located::Invalid(format!("registry grid code: {error}")),
            },
            registry::LocateAnswer::Unserved => Located::Outside,
            registry::LocateAnswer::Rejected { message, .. } => Located::Invalid(message),
        }
    }
}

/// What intake stores on the INTAKE stream per submission (postcard, frozen as v1 under the
/// event type `intake.submission`): the receipt plus what an auditor needs, never contact
/// details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntakeEvent {
    Filed {
        submission_id: String,
        incident: uuid::Uuid,
        grid_code: String,
        respond_by_ms: i64,
        kind: SubmissionKind,
        channel: Channel,
        category: String,
        reporter: uuid::Uuid,
        occurred_at_ms: i64,
        media: u8,
    },
    Merged {
        submission_id: String,
        incident: uuid::Uuid,
        grid_code: String,
        respond_by_ms: i64,
        kind: SubmissionKind,
        channel: Channel,
        category: String,
        reporter: uuid::Uuid,
        occurred_at_ms: i64,
        media: u8,
    },
    Rejected {
        submission_id: Option<String>,
        reporter: Option<uuid::Uuid>,
        channel: Option<Channel>,
        reason_code: ReasonCode,
        message: String,
        payload_bytes: u32,
        payload_sha256: [u8; 32],
    },
    /// A reporter's contact details were erased on request (`intake.contact.erase`), stored
    /// before the erasure itself under the aggregate `erasure.<reporter>` (see
    /// [`erasure_aggregate`]): the auditor sees that, when and on whose request details were
    /// erased, never the details. Added after the three above, so their stored bytes are
    /// unchanged.
    ContactErased {
        reporter: uuid::Uuid,
        /// The personal-information office's reference for the request, if it gave one.
        request_reference: Option<String>,
    },
}

/// Renders Unix milliseconds as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    Timestamp(ms).to_string()
}

impl IntakeEvent {
    /// The receipt a submission's record answers with; `None` for a record that is not about
    /// a submission (an erasure).
    pub fn receipt(&self) -> Option<Receipt> {
        Some(match self {
            IntakeEvent::Filed {
                submission_id,
                incident,
                grid_code,
                respond_by_ms,
                ..
            } => filed_receipt(
                submission_id,
                IncidentId(*incident),
                grid_code.clone(),
                *respond_by_ms,
            ),
            IntakeEvent::Merged {
                submission_id,
                incident,
                grid_code,
                respond_by_ms,
                ..
            } => merged_receipt(
                submission_id,
                IncidentId(*incident),
                grid_code.clone(),
                *respond_by_ms,
            ),
            IntakeEvent::Rejected {
                submission_id,
                reason_code,
                message,
                ..
            } => rejected_receipt(submission_id.clone(), *reason_code, message.clone()),
            IntakeEvent::ContactErased { .. } => return None,
        })
    }

    pub fn submission_id(&self) -> Option<&str> {
        match self {
            IntakeEvent::Filed { submission_id, .. }
            | IntakeEvent::Merged { submission_id, .. } => Some(submission_id),
            IntakeEvent::Rejected { submission_id, .. } => submission_id.as_deref(),
            IntakeEvent::ContactErased { .. } => None,
        }
    }
}

/// The INTAKE aggregate of a reporter's erasure records: `erasure.<reporter id>`. The dot
/// keeps it apart from every submission's aggregate (a submission id has none).
pub fn erasure_aggregate(reporter: uuid::Uuid) -> String {
    format!("erasure.{}", reporter.hyphenated())
}

/// The INTAKE aggregate of a submission: its id, or for a payload without a usable id,
/// `raw-` + the first 40 hex digits of the payload's SHA-256.
pub fn intake_aggregate(submission_id: Option<&str>, payload_sha256: &[u8; 32]) -> String {
    match submission_id {
        Some(id) => id.to_owned(),
        None => format!("raw-{}", &hex::encode(payload_sha256)[..40]),
    }
}

/// Where a duplicate was merged, for its receipt.
#[derive(Debug, Clone)]
struct MergedInto {
    original: IncidentId,
    grid_code: String,
    respond_by_ms: i64,
}

/// Who routes a new incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The filing commit routes it (the table's `Dispatch` by the system), with deadlines
    /// from the filing's `now`, the submission's arrival.
    AtFiling,
    /// The filing commit does not: dispatch routes the filed incident on its own clock. For
    /// a submission decided long after it arrived (intake was down, or redelivered it), whose
    /// deadlines counted from its arrival would be partly or wholly spent before its handler
    /// heard of it.
    ByDispatch {
        /// When intake decides the submission (on the clock its decisions use): the receipt's
        /// `respond_by` counts from here, the earliest moment dispatch can route it, so the
        /// promise is not already spent when the reporter reads it.
        decided_at: Timestamp,
    },
}

impl Routing {
    /// The moment the receipt's `respond_by` counts from, for a submission that arrived at
    /// `arrived`.
    pub fn deadlines_from(self, arrived: Timestamp) -> Timestamp {
        match self {
            Routing::AtFiling => arrived,
            Routing::ByDispatch { decided_at } => Timestamp(decided_at.0.max(arrived.0)),
        }
    }
}

/// What the shell must store for one submission, in order: `incident` commit (if any) on
/// INCIDENTS, then `record` on INTAKE; then reply with `receipt` and ack.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub receipt: Receipt,
    /// INTAKE record to append (`None`: nothing new, e.g. a resubmission).
    pub record: Option<(String, IntakeEvent)>,
    /// INCIDENTS commit to append: aggregate, command id, events.
    pub incident: Option<IncidentWrite>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IncidentWrite {
    pub incident: IncidentId,
    pub command_id: String,
    pub events: Vec<IncidentEvent>,
    /// The reporter whose rate-limit token this plan took: given back
    /// ([`Core::refund_token`]) if the write is not stored, so a submission decided again is
    /// charged once.
    pub charged_reporter: Option<uuid::Uuid>,
}

/// An incident intake follows (not terminal), with where it stands in the stream.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub state: IncidentState,
    pub position: Position,
    pub point: Option<(f64, f64)>,
    pub reported_at_ms: i64,
    /// The `respond_by` its filing's receipt promised (its `incident.submission_taken`):
    /// what a report merged into it is told while it has no response deadline yet.
    pub promised_ms: Option<i64>,
    cell: Option<Cell>,
}

impl Tracked {
    /// The deadline a receipt naming this incident tells (a report merged into it, or its own
    /// filing answered again): its response deadline once routed, before that the one its
    /// filing promised (a filing left for dispatch to route). The same whether the receipt is
    /// decided now or rebuilt from the log.
    fn receipt_deadline_ms(&self) -> Option<i64> {
        self.state.response.map(|due| due.at.0).or(self.promised_ms)
    }
}

type Cell = (CategoryCode, i64, i64);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// How a commit from the INCIDENTS stream was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded {
    Applied,
    AlreadyHeld,
    /// The commit does not follow the held version: reload the aggregate.
    Gap,
}

/// Intake's working state.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    incidents: HashMap<IncidentId, Tracked>,
    cells: HashMap<Cell, Vec<IncidentId>>,
    /// Receipts by submission id, each with the number of its entry in `receipt_order`.
    receipts: HashMap<String, (Receipt, u64)>,
    /// Submission ids oldest first, each with its entry's number: an entry whose number is
    /// not its receipt's is stale (forgotten, or remembered again since), and skipped.
    receipt_order: VecDeque<(String, u64)>,
    receipt_entries: u64,
    receipts_evicted: bool,
    /// Where the incident id a submission would have filed (hashed from its id) was merged
    /// into, from the stored `DuplicateMerged` events, newest [`MERGES_HELD_MAX`].
    merged_into: HashMap<IncidentId, MergedInto>,
    merged_order: VecDeque<IncidentId>,
    buckets: HashMap<uuid::Uuid, Bucket>,
}

fn role_for(channel: Channel) -> Role {
    match channel {
        Channel::App | Channel::Hotline => Role::Resident,
        Channel::Patrol => Role::GridWorker,
    }
}

fn system_actor() -> Actor {
    Actor {
        role: Role::System,
        id: ActorId(uuid::Uuid::nil()),
    }
}

/// Maps a decoder refusal to the record stored for it.
pub fn refusal_event(refusal: &Refusal, payload: &[u8]) -> IntakeEvent {
    IntakeEvent::Rejected {
        submission_id: refusal.submission_id.clone(),
        reporter: refusal.reporter_id,
        channel: refusal.channel,
        reason_code: refusal.reason_code,
        message: refusal.message.clone(),
        payload_bytes: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        payload_sha256: Sha256::digest(payload).into(),
    }
}

impl Core {
    pub fn new(config: CoreConfig) -> Core {
        Core {
            config,
            incidents: HashMap::new(),
            cells: HashMap::new(),
            receipts: HashMap::new(),
            receipt_order: VecDeque::new(),
            receipt_entries: 0,
            merged_into: HashMap::new(),
            merged_order: VecDeque::new(),
            receipts_evicted: false,
            buckets: HashMap::new(),
        }
    }

    pub fn open_incidents(&self) -> usize {
        self.incidents.len()
    }

    pub fn tracked(&self, incident: &IncidentId) -> Option<&Tracked> {
        self.incidents.get(incident)
    }

    pub fn receipt(&self, submission_id: &str) -> Option<&Receipt> {
        self.receipts.get(submission_id).map(|(receipt, _)| receipt)
    }

    /// True once some receipts were dropped from memory: an unknown id must then be looked up
    /// in the store before deciding.
    pub fn receipts_evicted(&self) -> bool {
        self.receipts_evicted
    }

    /// Remembers a receipt (from the INTAKE stream at start, or just decided).
    pub fn remember(&mut self, submission_id: &str, receipt: Receipt) {
        if let Some((held, _)) = self.receipts.get_mut(submission_id) {
            *held = receipt;
        } else {
            self.receipt_entries += 1;
            let entry = self.receipt_entries;
            self.receipts
                .insert(submission_id.to_owned(), (receipt, entry));
            self.receipt_order
                .push_back((submission_id.to_owned(), entry));
        }
        while self.receipts.len() > self.config.receipts_held_max {
            let Some((oldest, entry)) = self.receipt_order.pop_front() else {
                break;
            };
            if self
                .receipts
                .get(&oldest)
                .is_some_and(|(_, held)| *held == entry)
            {
                self.receipts.remove(&oldest);
                self.receipts_evicted = true;
            }
        }
        // Stale entries (a receipt forgotten, one remembered again) are dropped once they
        // make up half of the queue, so it stays within twice the receipts held. Before, the
        // queue grew with every retry of a submission the store refused, and a stale entry
        // evicted a current receipt early.
        if self.receipt_order.len() > 2 * self.receipts.len().max(1024) {
            let receipts = &self.receipts;
            self.receipt_order
                .retain(|(id, entry)| receipts.get(id).is_some_and(|(_, held)| held == entry));
        }
    }

    /// Remembers that `duplicate` (a submission's would-be incident) was merged, as stored.
    fn remember_merge(&mut self, duplicate: IncidentId, merged: MergedInto) {
        if self.merged_into.insert(duplicate, merged).is_none() {
            self.merged_order.push_back(duplicate);
        }
        while self.merged_into.len() > MERGES_HELD_MAX {
            let Some(oldest) = self.merged_order.pop_front() else {
                break;
            };
            self.merged_into.remove(&oldest);
        }
    }

    /// Drops a receipt whose decision could not be stored.
    pub fn forget_receipt(&mut self, submission_id: &str) {
        self.receipts.remove(submission_id);
    }

    fn cell_of(&self, category: CategoryCode, (lon, lat): (f64, f64)) -> Cell {
        let size = (self.config.dedup_radius_m / METRES_PER_DEGREE).max(1e-7);
        (
            category,
            (lon * lat.to_radians().cos() / size).floor() as i64,
            (lat / size).floor() as i64,
        )
    }

    fn index(&mut self, id: IncidentId) {
        let Some(tracked) = self.incidents.get(&id) else {
            return;
        };
        let want = match (tracked.state.category, tracked.point) {
            (Some(category), Some(point)) if !tracked.state.is_terminal() => {
                Some(self.cell_of(category, point))
            }
            _ => None,
        };
        if want == tracked.cell {
            return;
        }
        if let Some(old) = tracked.cell
            && let Some(list) = self.cells.get_mut(&old)
        {
            list.retain(|x| *x != id);
            if list.is_empty() {
                self.cells.remove(&old);
            }
        }
        if let Some(new) = want {
            self.cells.entry(new).or_default().push(id);
        }
        if let Some(tracked) = self.incidents.get_mut(&id) {
            tracked.cell = want;
        }
    }

    /// Drops `id` from memory (closed, terminal, or not known to match the store).
    pub fn forget(&mut self, id: IncidentId) {
        if let Some(tracked) = self.incidents.get_mut(&id) {
            tracked.state.status = Status::Closed;
        }
        self.index(id);
        self.incidents.remove(&id);
    }

    /// Folds a commit of the INCIDENTS stream (at start, or one another service wrote). Its
    /// status update is not intake's to publish: the writer of a commit announces it.
    pub fn fold(&mut self, commit: &RecordedCommit<IncidentEvent>) -> Folded {
        let Ok(uuid) = uuid::Uuid::parse_str(commit.aggregate.as_str()) else {
            return Folded::AlreadyHeld;
        };
        let id = IncidentId(uuid);
        let held = self
            .incidents
            .get(&id)
            .map_or(0, |tracked| tracked.position.version);
        if commit.version <= held {
            return Folded::AlreadyHeld;
        }
        if commit.first_version != held + 1 {
            return Folded::Gap;
        }
        let tracked = self.incidents.entry(id).or_insert_with(|| Tracked {
            state: IncidentState::default(),
            position: Position::NEW,
            point: None,
            reported_at_ms: commit.meta.occurred_at_ms,
            promised_ms: None,
            cell: None,
        });
        let mut taken = None;
        let mut merged_here = Vec::new();
        for recorded in &commit.events {
            match &recorded.event {
                IncidentEvent::DuplicateMerged { duplicate, .. } => merged_here.push(*duplicate),
                IncidentEvent::Reported {
                    position: Some(position),
                    ..
                } => tracked.point = Some(from_e7(*position)),
                IncidentEvent::SubmissionTaken {
                    submission_id,
                    respond_by,
                    ..
                } => {
                    taken = Some((submission_id, *respond_by));
                    tracked.promised_ms = Some(respond_by.0);
                }
                _ => {}
            }
            tracked.state.apply(&recorded.event);
        }
        tracked.position = commit.position();
        // The filing's receipt lives in its commit: taking the commit in restores it.
        let filed = taken.and_then(|(submission_id, respond_by)| {
            let grid = tracked.state.grid?;
            Some((
                submission_id,
                filed_receipt(submission_id, id, grid.to_string(), respond_by.0),
            ))
        });
        let merged_details = tracked
            .state
            .grid
            .map(|grid| (grid.to_string(), tracked.receipt_deadline_ms()));
        let terminal = tracked.state.is_terminal();
        if let Some((grid_code, respond_by_ms)) = merged_details {
            for duplicate in merged_here {
                self.remember_merge(
                    duplicate,
                    MergedInto {
                        original: id,
                        grid_code: grid_code.clone(),
                        respond_by_ms: respond_by_ms.unwrap_or(commit.meta.occurred_at_ms),
                    },
                );
            }
        }
        if let Some((submission_id, receipt)) = filed {
            self.remember(submission_id, receipt);
        }
        if terminal {
            self.forget(id);
        } else {
            self.index(id);
        }
        Folded::Applied
    }

    /// Replaces an incident's state with a freshly loaded history (after a gap or a failed
    /// write).
    pub fn reload(&mut self, id: IncidentId, commits: &[RecordedCommit<IncidentEvent>]) {
        self.forget(id);
        for commit in commits {
            self.fold(commit);
        }
    }

    /// Sets where an incident stands after intake's own append.
    pub fn appended(&mut self, id: IncidentId, position: Position) {
        if let Some(tracked) = self.incidents.get_mut(&id)
            && position.version > tracked.position.version
        {
            tracked.position = position;
        }
    }

    /// Gives back the token a plan took when its write was not stored (the submission will be
    /// decided again, or answered `error` and sent again).
    pub fn refund_token(&mut self, reporter: uuid::Uuid) {
        let burst = f64::from(self.config.rate_burst);
        if let Some(bucket) = self.buckets.get_mut(&reporter) {
            bucket.tokens = (bucket.tokens + 1.0).min(burst);
        }
    }

    fn take_token(&mut self, reporter: uuid::Uuid, now_ms: i64) -> bool {
        let config = self.config;
        if self.buckets.len() >= config.reporters_tracked_max
            && !self.buckets.contains_key(&reporter)
        {
            let burst = f64::from(config.rate_burst);
            let refill = config.rate_refill_ms.max(1) as f64;
            self.buckets.retain(|_, bucket| {
                bucket.tokens + (now_ms - bucket.at_ms).max(0) as f64 / refill < burst
            });
            if self.buckets.len() >= config.reporters_tracked_max {
                self.buckets.clear();
            }
        }
        let bucket = self.buckets.entry(reporter).or_insert(Bucket {
            tokens: f64::from(config.rate_burst),
            at_ms: now_ms,
        });
        let elapsed = (now_ms - bucket.at_ms).max(0) as f64;
        bucket.tokens = (bucket.tokens + elapsed / config.rate_refill_ms.max(1) as f64)
            .min(f64::from(config.rate_burst));
        bucket.at_ms = bucket.at_ms.max(now_ms);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The nearest open incident of `category` within the radius and window, if any.
    fn duplicate_of(
        &self,
        category: CategoryCode,
        point: (f64, f64),
        now_ms: i64,
        own: IncidentId,
    ) -> Option<IncidentId> {
        let (_, x, y) = self.cell_of(category, point);
        let mut best: Option<(f64, IncidentId)> = None;
        for dx in -1..=1 {
            for dy in -1..=1 {
                let Some(list) = self.cells.get(&(category, x + dx, y + dy)) else {
                    continue;
                };
                for id in list {
                    let Some(tracked) = self.incidents.get(id) else {
                        continue;
                    };
                    let Some(other) = tracked.point else { continue };
                    if *id == own || now_ms - tracked.reported_at_ms > self.config.dedup_window_ms {
                        continue;
                    }
                    let distance = distance_m(point, other);
                    if distance <= self.config.dedup_radius_m
                        && best.is_none_or(|(d, _)| distance < d)
                    {
                        best = Some((distance, *id));
                    }
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// Decides what one valid submission becomes. Updates the in-memory state as if the plan
    /// were stored; on a failed write the shell reloads the incident it touched.
    pub fn plan(
        &mut self,
        submission: ValidSubmission,
        payload: &[u8],
        now: Timestamp,
        routing: Routing,
        locator: &dyn Locate,
        policy: &Policy,
    ) -> Plan {
        if let Some((receipt, _)) = self.receipts.get(&submission.submission_id) {
            return Plan {
                receipt: receipt.clone(),
                record: None,
                incident: None,
            };
        }
        let own = incident_id_for(&submission.submission_id);
        let reject = |core: &mut Core, reason_code: ReasonCode, message: String| {
            let refusal = Refusal {
                submission_id: Some(submission.submission_id.clone()),
                reporter_id: Some(submission.reporter_id),
                channel: Some(submission.channel),
                reason_code,
                message,
            };
            let event = refusal_event(&refusal, payload);
            let receipt = refusal.receipt();
            core.remember(&submission.submission_id, receipt.clone());
            Plan {
                receipt,
                record: Some((submission.submission_id.clone(), event)),
                incident: None,
            }
        };
        if submission.occurred_at_ms > now.0.saturating_add(OCCURRED_AT_AHEAD_MAX_MS) {
            return reject(
                self,
                ReasonCode::SchemaViolation,
                format!(
                    "occurred_at {} is more than {} minutes after the report arrived ({})",
                    rfc3339(submission.occurred_at_ms),
                    OCCURRED_AT_AHEAD_MAX_MS / 60_000,
                    rfc3339(now.0)
                ),
            );
        }
        // An incident held but not known to be stored (planned here, its append failed) is
        // no filing: decide this submission afresh (a commit that was stored after all is
        // met as the same command by the append).
        if self
            .incidents
            .get(&own)
            .is_some_and(|t| t.position.is_new())
        {
            self.forget(own);
        }
        // Merged before (its merge commit is stored) but its receipt was not (a crash between
        // the two, a record that failed): answer with that merge, whatever the incidents look
        // like now. Decided again, it could be merged elsewhere or filed anew (the original
        // closed meanwhile, or a nearer one appeared): two outcomes for one submission.
        if let Some(merged) = self.merged_into.get(&own).cloned() {
            let media = u8::try_from(submission.media.len()).unwrap_or(u8::MAX);
            let event = IntakeEvent::Merged {
                submission_id: submission.submission_id.clone(),
                incident: merged.original.0,
                grid_code: merged.grid_code.clone(),
                respond_by_ms: merged.respond_by_ms,
                kind: submission.kind,
                channel: submission.channel,
                category: submission.category.to_string(),
                reporter: submission.reporter_id,
                occurred_at_ms: submission.occurred_at_ms,
                media,
            };
            let receipt = merged_receipt(
                &submission.submission_id,
                merged.original,
                merged.grid_code,
                merged.respond_by_ms,
            );
            self.remember(&submission.submission_id, receipt.clone());
            return Plan {
                receipt,
                record: Some((submission.submission_id.clone(), event)),
                incident: None,
            };
        }
        // Filed before a crash, receipt not yet stored: store the receipt only.
        let already_filed = self.incidents.get(&own).map(|t| t.state.grid);
        if already_filed.is_none() && !self.take_token(submission.reporter_id, now.0) {
            return reject(
                self,
                ReasonCode::RateLimited,
                format!(
                    "reporter sent more than {} submissions; one more is allowed every {} s, \
                     under a new submission_id (this one keeps this answer)",
                    self.config.rate_burst,
                    self.config.rate_refill_ms / 1000
                ),
            );
        }
        let (grid, point) = match locator.locate(&submission.place) {
            Located::Grid { grid, point } => (grid, point),
            Located::Outside => {
                return reject(
                    self,
                    ReasonCode::OutsideCommunities,
                    "the location is outside every community with grids".to_owned(),
                );
            }
            Located::UnknownBuilding(message) => {
                return reject(self, ReasonCode::UnknownBuilding, message);
            }
            Located::Invalid(message) => {
                return reject(self, ReasonCode::SchemaViolation, message);
            }
        };
        let category = submission.category;
        let respond_by = match policy.routing.route(category, grid.street()) {
            Some(route) => {
                policy
                    .calendar
                    .add(
                        routing.deadlines_from(now),
                        route.response_minutes,
                        route.clock,
                    )
                    .0
            }
            None => {
                return reject(
                    self,
                    ReasonCode::Refused,
                    Rejection::NoRoute {
                        category,
                        street: grid.street(),
                    }
                    .to_string(),
                );
            }
        };
        let command_id = format!("intake-{}", submission.submission_id);
        let reporter = Actor {
            role: role_for(submission.channel),
            id: ActorId(submission.reporter_id),
        };
        let media = u8::try_from(submission.media.len()).unwrap_or(u8::MAX);
        if already_filed.flatten().is_none()
            && let Some(point) = point
            && let Some(original) = self.duplicate_of(category, point, now.0, own)
            && let Some(tracked) = self.incidents.get(&original)
        {
            let merge = decide_on(
                &tracked.state,
                system_actor(),
                Action::MergeDuplicate {
                    duplicate: own,
                    reporter: reporter.id,
                },
                now,
                policy,
            );
            let grid_code = tracked.state.grid.unwrap_or(grid).to_string();
            let respond_by_ms = tracked.receipt_deadline_ms().unwrap_or(respond_by);
            let merged = |events| {
                let event = IntakeEvent::Merged {
                    submission_id: submission.submission_id.clone(),
                    incident: original.0,
                    grid_code: grid_code.clone(),
                    respond_by_ms,
                    kind: submission.kind,
                    channel: submission.channel,
                    category: category.to_string(),
                    reporter: submission.reporter_id,
                    occurred_at_ms: submission.occurred_at_ms,
                    media,
                };
                let receipt = merged_receipt(
                    &submission.submission_id,
                    original,
                    grid_code.clone(),
                    respond_by_ms,
                );
                Plan {
                    receipt,
                    record: Some((submission.submission_id.clone(), event)),
                    incident: events,
                }
            };
            match merge {
                Ok(events) => {
                    if let Some(tracked) = self.incidents.get_mut(&original) {
                        for event in &events {
                            tracked.state.apply(event);
                        }
                    }
                    let plan = merged(Some(IncidentWrite {
                        incident: original,
                        command_id,
                        events,
                        charged_reporter: already_filed.is_none().then_some(submission.reporter_id),
                    }));
                    self.remember(&submission.submission_id, plan.receipt.clone());
                    return plan;
                }
                // Merged before a crash, receipt not yet stored.
                Err(Rejection::AlreadyAReporter(_)) => {
                    let plan = merged(None);
                    self.remember(&submission.submission_id, plan.receipt.clone());
                    return plan;
                }
                // Too many reporters on the original: file a new incident instead.
                Err(_) => {}
            }
        }
        let events = if already_filed.flatten().is_some() {
            Vec::new()
        } else {
            let reported = decide_on(
                &IncidentState::default(),
                reporter,
                Action::Report {
                    incident: own,
                    description: submission.description.clone(),
                    position: point.map(to_e7),
                    category_hint: Some(category),
                },
                now,
                policy,
            );
            let mut events = match reported {
                Ok(events) => events,
                Err(rejection) => return reject(self, ReasonCode::Refused, rejection.to_string()),
            };
            let state = IncidentState::from_events(&events);
            match decide_on(
                &state,
                system_actor(),
                Action::File { grid, category },
                now,
                policy,
            ) {
                Ok(filed) => events.extend(filed),
                Err(Rejection::UnknownCategory(code)) => {
                    return reject(
                        self,
                        ReasonCode::UnknownCategory,
                        Rejection::UnknownCategory(code).to_string(),
                    );
                }
                Err(rejection) => return reject(self, ReasonCode::Refused, rejection.to_string()),
            }
            // The filing commit keeps the submission and the promised deadline: it is the
            // receipt.
            let state = IncidentState::from_events(&events);
            match decide_on(
                &state,
                system_actor(),
                Action::TakeSubmission {
                    submission_id: submission.submission_id.clone(),
                    kind: submission.kind.into(),
                    channel: submission.channel.into(),
                    occurred_at: Timestamp(submission.occurred_at_ms),
                    media,
                    respond_by: Timestamp(respond_by),
                },
                now,
                policy,
            ) {
                Ok(taken) => events.extend(taken),
                Err(rejection) => return reject(self, ReasonCode::Refused, rejection.to_string()),
            }
            // Routed by the city's table in the same commit: one stored message per filed
            // incident instead of a filing and a dispatch (docs/INTAKE.md, "Dispatched at
            // filing"). `respond_by` above is the deadline this dispatch sets. A submission
            // decided long after it arrived (`Routing::ByDispatch`, its receipt's `respond_by`
            // counted from the decision) is filed undispatched, and
            // so is one whose dispatch the decider refused: dispatch routes it, as it does
            // every filing without a dispatch.
            let state = IncidentState::from_events(&events);
            if routing == Routing::AtFiling
                && let Ok(dispatched) = decide_on(
                    &state,
                    system_actor(),
                    Action::Dispatch { to: None },
                    now,
                    policy,
                )
            {
                events.extend(dispatched);
            }
            let state = IncidentState::from_events(&events);
            debug_assert!(
                state.response.is_none_or(|due| due.at.0 == respond_by),
                "the receipt promises the deadline the dispatch set"
            );
            self.incidents.insert(
                own,
                Tracked {
                    state,
                    position: Position::NEW,
                    point,
                    reported_at_ms: now.0,
                    promised_ms: Some(respond_by),
                    cell: None,
                },
            );
            self.index(own);
            events
        };
        // Filed before, its receipt not kept (an incident filed by a version before
        // `incident.submission_taken`, its INTAKE record lost in a crash): the receipt says
        // what the stored incident says, not what this submission would get now.
        let (grid, respond_by) = match self.incidents.get(&own) {
            Some(tracked) if already_filed.flatten().is_some() => (
                tracked.state.grid.unwrap_or(grid),
                tracked.receipt_deadline_ms().unwrap_or(respond_by),
            ),
            _ => (grid, respond_by),
        };
        let receipt = filed_receipt(&submission.submission_id, own, grid.to_string(), respond_by);
        self.remember(&submission.submission_id, receipt.clone());
        // A fresh filing's receipt is its commit's `SubmissionTaken`: one stored message. Only
        // an incident filed without one (by a version before it, its receipt lost in a crash)
        // gets an INTAKE record now.
        let record = events.is_empty().then(|| {
            let event = IntakeEvent::Filed {
                submission_id: submission.submission_id.clone(),
                incident: own.0,
                grid_code: grid.to_string(),
                respond_by_ms: respond_by,
                kind: submission.kind,
                channel: submission.channel,
                category: category.to_string(),
                reporter: submission.reporter_id,
                occurred_at_ms: submission.occurred_at_ms,
                media,
            };
            (submission.submission_id.clone(), event)
        });
        Plan {
            receipt,
            record,
            incident: (!events.is_empty()).then_some(IncidentWrite {
                incident: own,
                command_id,
                events,
                charged_reporter: already_filed.is_none().then_some(submission.reporter_id),
            }),
        }
    }
}

/// The receipt of a submission merged into the open `incident` in `grid_code`.
pub fn merged_receipt(
    submission_id: &str,
    incident: IncidentId,
    grid_code: String,
    respond_by_ms: i64,
) -> Receipt {
    Receipt::Merged {
        submission_id: submission_id.to_owned(),
        incident_id: incident.0,
        grid_code,
        respond_by: rfc3339(respond_by_ms),
        respond_by_ms,
    }
}

/// The receipt of a refused submission (`submission_id` is `None` when it had no usable id).
pub fn rejected_receipt(
    submission_id: Option<String>,
    reason_code: ReasonCode,
    message: String,
) -> Receipt {
    Receipt::Rejected {
        submission_id,
        reason_code,
        message,
    }
}

impl Refusal {
    /// The receipt that answers this refusal.
    pub fn receipt(&self) -> Receipt {
        rejected_receipt(
            self.submission_id.clone(),
            self.reason_code,
            self.message.clone(),
        )
    }
}

/// The receipt of a submission filed as `incident` in `grid`.
pub fn filed_receipt(
    submission_id: &str,
    incident: IncidentId,
    grid_code: String,
    respond_by_ms: i64,
) -> Receipt {
    Receipt::Filed {
        submission_id: submission_id.to_owned(),
        incident_id: incident.0,
        grid_code,
        respond_by: rfc3339(respond_by_ms),
        respond_by_ms,
    }
}

/// The receipt of `submission_id` as an incident's history holds it (its filing commit's
/// `SubmissionTaken`), if that history is the filing of that submission.
pub fn receipt_in_history<'a>(
    submission_id: &str,
    incident: IncidentId,
    events: impl IntoIterator<Item = &'a IncidentEvent>,
) -> Option<Receipt> {
    let mut grid = None;
    let mut respond_by = None;
    for event in events {
        match event {
            IncidentEvent::Filed { grid: filed, .. } => grid = grid.or(Some(*filed)),
            IncidentEvent::SubmissionTaken {
                submission_id: taken,
                respond_by: due,
                ..
            } if taken == submission_id => respond_by = Some(*due),
            _ => {}
        }
    }
    Some(filed_receipt(
        submission_id,
        incident,
        grid?.to_string(),
        respond_by?.0,
    ))
}

impl From<SubmissionKind> for incident::SubmissionKind {
    fn from(kind: SubmissionKind) -> Self {
        match kind {
            SubmissionKind::Consultation => incident::SubmissionKind::Consultation,
            SubmissionKind::Suggestion => incident::SubmissionKind::Suggestion,
            SubmissionKind::ProblemReport => incident::SubmissionKind::ProblemReport,
            SubmissionKind::Complaint => incident::SubmissionKind::Complaint,
        }
    }
}

impl From<Channel> for incident::Channel {
    fn from(channel: Channel) -> Self {
        match channel {
            Channel::App => incident::Channel::App,
            Channel::Hotline => incident::Channel::Hotline,
            Channel::Patrol => incident::Channel::Patrol,
        }
    }
}

fn decide_on(
    state: &IncidentState,
    actor: Actor,
    action: Action,
    now: Timestamp,
    policy: &Policy,
) -> Result<Vec<IncidentEvent>, Rejection> {
    incident::decide(state, IncidentCommand { actor, action }, now, policy)
}

fn to_e7((lon, lat): (f64, f64)) -> DomainPosition {
    DomainPosition {
        lat_e7: (lat * 1e7).round() as i32,
        lon_e7: (lon * 1e7).round() as i32,
    }
}

fn from_e7(position: DomainPosition) -> (f64, f64) {
    (
        f64::from(position.lon_e7) / 1e7,
        f64::from(position.lat_e7) / 1e7,
    )
}

/// Equirectangular distance in metres (exact enough within a few hundred metres).
fn distance_m((lon1, lat1): (f64, f64), (lon2, lat2): (f64, f64)) -> f64 {
    let mean_lat = ((lat1 + lat2) / 2.0).to_radians();
    let dx = (lon2 - lon1) * mean_lat.cos() * METRES_PER_DEGREE;
    let dy = (lat2 - lat1) * METRES_PER_DEGREE;
    (dx * dx + dy * dy).sqrt()
}
