//! The public view of an incident (`incidents.status.<id>`, `incidents.query.get`): status,
//! grid, category, handler and deadlines — never actor ids or contact details.

use domain::IncidentId;
use domain::incident::IncidentState;

use crate::wire::IncidentStatus;

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
