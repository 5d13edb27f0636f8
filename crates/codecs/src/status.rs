//! The public view of an incident, `incidents.status.<incident_id>`: shared by the two
//! services that write incident commits (intake files, routes and merges, dispatch does
//! everything after), because the writer of a commit is the one that announces it — exactly once per
//! stored commit, however many instances run.

use domain::IncidentId;
use domain::incident::IncidentState;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Per-incident status updates: `incidents.status.<incident_id>`.
pub const SUBJECT_STATUS_PREFIX: &str = "incidents.status.";

/// An incident as the public sees it: no actor ids, no contact details. Published on
/// `incidents.status.<incident_id>` after every change, and the answer of
/// `incidents.query.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IncidentStatus {
    pub incident_id: uuid::Uuid,
    /// `reported`, `filed`, `dispatched`, `acknowledged`, `resolved`, `closed`, `rejected`,
    /// `cancelled`, `parked`, `merged`.
    pub status: String,
    /// Aggregate version after the change (gap-free, starts at 1).
    pub version: u64,
    /// Event types of the change, e.g. `["incident.dispatched"]`; empty in an answer to
    /// `incidents.query.get`, which reports the state, not a change.
    pub events: Vec<String>,
    pub grid_code: Option<String>,
    pub category: Option<String>,
    /// `grid_worker`, `community`, `street` or `department:<id>`.
    pub handler: Option<String>,
    /// The handler's response deadline, set when the incident is dispatched (null before:
    /// the receipt's `respond_by` is the deadline expected at filing).
    pub respond_by_ms: Option<i64>,
    /// The resolution deadline, set when the incident is dispatched.
    pub resolve_by_ms: Option<i64>,
    /// Reporters merged in besides the first.
    pub additional_reporters: u32,
    /// When the change was decided, Unix milliseconds.
    pub changed_at_ms: i64,
}

/// The public view of `state` after the change that produced `events` at `version`.
pub fn view(
    incident: IncidentId,
    state: &IncidentState,
    version: u64,
    events: Vec<String>,
    changed_at_ms: i64,
) -> IncidentStatus {
    IncidentStatus {
        incident_id: incident.0,
        status: state.status.as_str().to_owned(),
        version,
        events,
        grid_code: state.grid.map(|grid| grid.to_string()),
        category: state.category.map(|category| category.to_string()),
        handler: state.handler.map(|handler| handler.to_string()),
        respond_by_ms: state.response.map(|due| due.at.0),
        resolve_by_ms: state.resolution.map(|due| due.at.0),
        additional_reporters: u32::try_from(state.co_reporters.len()).unwrap_or(u32::MAX),
        changed_at_ms,
    }
}

/// The subject of `incident`'s status updates.
pub fn status_subject(incident: IncidentId) -> String {
    format!("{SUBJECT_STATUS_PREFIX}{}", incident.0)
}
