//! Plain-language descriptions of incident events, for audit timelines and read models.
//!
//! WHY here and not in the CLI: the sentence an inspector reads about an event is part of the
//! domain's vocabulary (who was summoned, which deadline was missed, which rung escalated), and
//! it must stay in step with the events themselves. Everything here is pure: the caller adds
//! the commit's time and actor from the envelope.

use std::fmt::Write as _;

use crate::ids::{DepartmentId, Timestamp};
use crate::incident::{
    Channel, DeadlineKind, Handler, IncidentEvent, Level, RejectReason, ReturnReason, RouteSource,
    Satisfaction, SubmissionKind, WhistleCause,
};
use crate::routing::WhistleKind;

/// One event in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    /// Stable snake_case name of the event kind (`dispatched`, `whistle_blown`, ...).
    pub kind: &'static str,
    /// One sentence for a non-programmer.
    pub summary: String,
    /// The reason or note given, if any.
    pub reason: Option<String>,
    /// Departments, roles or people the event concerns (`department:zhujian`, `street`, ...).
    pub concerns: Vec<String>,
}

/// Describes `event` in words, its times in UTC.
pub fn describe(event: &IncidentEvent) -> Description {
    describe_at(event, 0)
}

/// Describes `event` in words, its times at `utc_offset_ms` from UTC (the city's calendar:
/// an inspector in Sanming reads 13:31+08:00, not 05:31Z).
pub fn describe_at(event: &IncidentEvent, utc_offset_ms: i64) -> Description {
    describe_named(event, utc_offset_ms, &|_| None)
}

/// [`describe_at`], naming each department the sentence mentions by `department_name` too
/// (the city's routing table knows `zhujian` as 住房和城乡建设局; an event holds only the id):
/// "department zhujian [住房和城乡建设局]". An id without a name reads as the id alone.
pub fn describe_named(
    event: &IncidentEvent,
    utc_offset_ms: i64,
    department_name: &dyn Fn(DepartmentId) -> Option<String>,
) -> Description {
    let department_text = |id: DepartmentId| match department_name(id) {
        Some(name) => format!("department {id} [{name}]"),
        None => format!("department {id}"),
    };
    let handler_text = |handler: Handler| match handler {
        Handler::Department(id) => department_text(id),
        other => handler_name(other),
    };
    let at = |time: &Timestamp| At {
        time: *time,
        utc_offset_ms,
    };
    let mut concerns = Vec::new();
    let mut reason = None;
    let (kind, summary) = match event {
        IncidentEvent::SubmissionTaken {
            submission_id,
            kind,
            channel,
            occurred_at,
            media,
            respond_by,
        } => ("submission_taken", {
            let (occurred_at, respond_by) = (at(occurred_at), at(respond_by));
            format!(
                "Submission {submission_id} taken: {} {}, occurred at {occurred_at}, \
                 {media} media reference{}; response promised by {respond_by}",
                match kind {
                    SubmissionKind::Consultation => "a consultation",
                    SubmissionKind::Suggestion => "a suggestion",
                    SubmissionKind::ProblemReport => "a problem report",
                    SubmissionKind::Complaint => "a complaint",
                },
                match channel {
                    Channel::App => "from the resident app",
                    Channel::Hotline => "from the 12345 hotline",
                    Channel::Patrol => "from a grid worker on patrol",
                },
                if *media == 1 { "" } else { "s" },
            )
        }),
        IncidentEvent::Reported {
            incident,
            position,
            category_hint,
            description,
            ..
        } => {
            let mut text = format!("Incident {incident} reported");
            if let Some(position) = position {
                let _ = write!(
                    text,
                    " at lon {:.6}, lat {:.6}",
                    f64::from(position.lon_e7) / 1e7,
                    f64::from(position.lat_e7) / 1e7
                );
            }
            if let Some(category) = category_hint {
                let _ = write!(text, ", category {category}");
            }
            let _ = write!(text, ": \"{}\"", shorten(description));
            ("reported", text)
        }
        IncidentEvent::Filed {
            grid,
            category,
            emergency,
            ..
        } => (
            "filed",
            format!(
                "Filed in grid {grid} as category {category}{}",
                if *emergency { " (emergency)" } else { "" }
            ),
        ),
        IncidentEvent::ReportRejected {
            reason: why, note, ..
        } => {
            reason = non_empty(note);
            (
                "report_rejected",
                format!("Report not taken up: {}", reject_reason(*why)),
            )
        }
        IncidentEvent::Dispatched {
            handler,
            source,
            response_due,
            resolution_due,
            ..
        } => {
            let (response_due, resolution_due) = (at(response_due), at(resolution_due));
            concerns.push(handler.to_string());
            (
                "dispatched",
                format!(
                    "Assigned to {} ({}); respond by {response_due}, resolve by {resolution_due}",
                    handler_text(*handler),
                    route_source(*source)
                ),
            )
        }
        IncidentEvent::Acknowledged { late, .. } => (
            "acknowledged",
            format!("Handler acknowledged the case{}", late_text(*late)),
        ),
        IncidentEvent::Resolved { late, note, .. } => {
            reason = non_empty(note);
            (
                "resolved",
                format!("Handler reported the case resolved{}", late_text(*late)),
            )
        }
        IncidentEvent::VerificationFailed {
            note,
            resolution_due,
            ..
        } => {
            reason = non_empty(note);
            let resolution_due = at(resolution_due);
            (
                "verification_failed",
                format!("Verification failed; to be resolved again by {resolution_due}"),
            )
        }
        IncidentEvent::Verified { .. } => ("verified", "Resolution verified on site".to_owned()),
        IncidentEvent::Closed { .. } => ("closed", "Case closed".to_owned()),
        IncidentEvent::Rated { satisfaction, .. } => (
            "rated",
            format!(
                "Reporter rated the handling: {}",
                satisfaction_text(*satisfaction)
            ),
        ),
        IncidentEvent::Reopened {
            reason: why,
            response_due,
            resolution_due,
            ..
        } => {
            reason = non_empty(why);
            let (response_due, resolution_due) = (at(response_due), at(resolution_due));
            (
                "reopened",
                format!("Case reopened; respond by {response_due}, resolve by {resolution_due}"),
            )
        }
        IncidentEvent::Returned {
            handler,
            reason: why,
            note,
            rerouted_to,
            source,
            response_due,
            resolution_due,
            ..
        } => {
            reason = non_empty(note);
            let (response_due, resolution_due) = (at(response_due), at(resolution_due));
            concerns.push(handler.to_string());
            concerns.push(rerouted_to.to_string());
            (
                "returned",
                format!(
                    "{} returned the case ({}); re-routed to {} ({}); respond by {response_due}, resolve by {resolution_due}",
                    capitalise(&handler_text(*handler)),
                    return_reason(*why),
                    handler_text(*rerouted_to),
                    route_source(*source)
                ),
            )
        }
        IncidentEvent::ExtensionRequested {
            minutes,
            reason: why,
            ..
        } => {
            reason = non_empty(why);
            (
                "extension_requested",
                format!("Handler asked for {minutes} more minutes"),
            )
        }
        IncidentEvent::ExtensionApproved {
            minutes,
            resolution_due,
            ..
        } => (
            "extension_approved",
            format!(
                "Extension of {minutes} minutes approved; resolve by {}",
                at(resolution_due)
            ),
        ),
        IncidentEvent::ExtensionDenied { note, .. } => {
            reason = non_empty(note);
            ("extension_denied", "Extension refused".to_owned())
        }
        IncidentEvent::Parked { reason: why, .. } => {
            reason = non_empty(why);
            ("parked", "Case parked; deadlines paused".to_owned())
        }
        IncidentEvent::Unparked {
            response_due,
            resolution_due,
            ..
        } => (
            "unparked",
            format!(
                "Case resumed; respond by {}, resolve by {}",
                at(response_due),
                at(resolution_due)
            ),
        ),
        IncidentEvent::DuplicateMerged {
            duplicate,
            reporter,
            ..
        } => (
            "duplicate_merged",
            format!("Report {duplicate} by reporter {reporter} merged into this case"),
        ),
        IncidentEvent::MergedInto { original, .. } => (
            "merged_into",
            format!("Merged into case {original} as a duplicate"),
        ),
        IncidentEvent::Cancelled { .. } => ("cancelled", "Case cancelled".to_owned()),
        IncidentEvent::DeadlineMissed {
            handler,
            deadline,
            due,
        } => {
            let due = at(due);
            concerns.push(handler.to_string());
            (
                "deadline_missed",
                format!(
                    "{} missed the {} deadline of {due}",
                    capitalise(&handler_text(*handler)),
                    deadline_name(*deadline)
                ),
            )
        }
        IncidentEvent::WhistleBlown {
            kind,
            level,
            cause,
            summoned,
            resolution_due,
        } => {
            let mut text = format!(
                "{} blown by the {} ({}): ",
                whistle_name(*kind),
                level_name(*level),
                cause_text(*cause)
            );
            if summoned.is_empty() {
                text.push_str("no department summoned");
            } else {
                text.push_str("summoned ");
                for (n, summons) in summoned.iter().enumerate() {
                    if n > 0 {
                        text.push_str(", ");
                    }
                    let _ = write!(
                        text,
                        "{} to report by {}",
                        department_text(summons.department),
                        at(&summons.report_by)
                    );
                    concerns.push(format!("department:{}", summons.department));
                }
            }
            if let Some(due) = resolution_due {
                let _ = write!(text, "; joint resolution by {}", at(due));
            }
            ("whistle_blown", text)
        }
        IncidentEvent::WhistleReported {
            department, late, ..
        } => {
            concerns.push(format!("department:{department}"));
            (
                "whistle_reported",
                format!(
                    "{} reported to the whistle{}",
                    capitalise(&department_text(*department)),
                    late_text(*late)
                ),
            )
        }
        IncidentEvent::WhistleReportMissed { department, due } => {
            concerns.push(format!("department:{department}"));
            (
                "whistle_report_missed",
                format!(
                    "{} did not report by {}",
                    capitalise(&department_text(*department)),
                    at(due)
                ),
            )
        }
        IncidentEvent::WhistleSummonsWithdrawn { department, .. } => {
            concerns.push(format!("department:{department}"));
            (
                "whistle_summons_withdrawn",
                format!(
                    "The whistle's summons of {} was withdrawn: the case was reassigned before it reported",
                    department_text(*department)
                ),
            )
        }
        IncidentEvent::WhistleEscalated {
            kind,
            from,
            to,
            cause,
            summoned,
            resolution_due,
        } => {
            let mut text = format!(
                "{} escalated from the {} to the {} ({})",
                whistle_name(*kind),
                level_name(*from),
                level_name(*to),
                cause_text(*cause)
            );
            for summons in summoned {
                let _ = write!(
                    text,
                    "; summoned {} to report by {}",
                    department_text(summons.department),
                    at(&summons.report_by)
                );
                concerns.push(format!("department:{}", summons.department));
            }
            if let Some(due) = resolution_due {
                let _ = write!(text, "; joint resolution by {}", at(due));
            }
            ("whistle_escalated", text)
        }
    };
    Description {
        kind,
        summary,
        reason,
        concerns,
    }
}

/// A time as a description shows it: UTC as `Timestamp` prints it (`…Z`), or at an offset
/// as RFC 3339 (`2026-11-23T13:31:00+08:00`).
struct At {
    time: Timestamp,
    utc_offset_ms: i64,
}

impl std::fmt::Display for At {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.utc_offset_ms == 0 {
            return write!(formatter, "{}", self.time);
        }
        let local = time::UtcOffset::from_whole_seconds(
            i32::try_from(self.utc_offset_ms / 1000).unwrap_or(0),
        )
        .ok()
        .and_then(|offset| {
            time::OffsetDateTime::from_unix_timestamp(self.time.0.div_euclid(1000))
                .ok()
                .and_then(|utc| utc.checked_to_offset(offset))
        })
        .filter(|local| (0..=9999).contains(&local.year()));
        match local {
            Some(local) => {
                let (hours, minutes, _) = local.offset().as_hms();
                write!(
                    formatter,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}{:02}:{:02}",
                    local.year(),
                    u8::from(local.month()),
                    local.day(),
                    local.hour(),
                    local.minute(),
                    local.second(),
                    if self.utc_offset_ms < 0 { '-' } else { '+' },
                    hours.unsigned_abs(),
                    minutes.unsigned_abs()
                )
            }
            None => write!(formatter, "{}", self.time),
        }
    }
}

/// Longest description excerpt in a summary, in characters.
const EXCERPT_CHARS_MAX: usize = 80;

fn shorten(text: &str) -> String {
    let mut chars = text.chars();
    let excerpt: String = chars.by_ref().take(EXCERPT_CHARS_MAX).collect();
    if chars.next().is_some() {
        format!("{excerpt}…")
    } else {
        excerpt
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_owned())
}

fn late_text(late: bool) -> &'static str {
    if late { ", late" } else { "" }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The handler in words.
pub fn handler_name(handler: Handler) -> String {
    match handler {
        Handler::GridWorker => "the grid worker".to_owned(),
        Handler::Community => "the community".to_owned(),
        Handler::Street => "the street office".to_owned(),
        Handler::Department(department) => format!("department {department}"),
    }
}

/// The rung in words, with its Chinese name.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Grid => "grid (网格)",
        Level::Community => "community (社区)",
        Level::Street => "street (街道)",
        Level::District => "district (区)",
        Level::City => "city (市)",
    }
}

/// The whistle kind in words, with its Chinese name.
pub fn whistle_name(kind: WhistleKind) -> &'static str {
    match kind {
        WhistleKind::Routine => "Routine whistle (日常哨)",
        WhistleKind::Tough => "Tough-case whistle (攻坚哨)",
        WhistleKind::Emergency => "Emergency whistle (应急哨)",
    }
}

fn deadline_name(kind: DeadlineKind) -> &'static str {
    match kind {
        DeadlineKind::Response => "response",
        DeadlineKind::Resolution => "resolution",
    }
}

fn cause_text(cause: WhistleCause) -> &'static str {
    match cause {
        WhistleCause::Emergency => "emergency category",
        WhistleCause::DeadlineMissed(DeadlineKind::Response) => "response deadline missed",
        WhistleCause::DeadlineMissed(DeadlineKind::Resolution) => "resolution deadline missed",
        WhistleCause::BeyondPowers => "beyond the handler's powers",
        WhistleCause::ReportsMissed => "summoned departments did not report",
    }
}

fn route_source(source: RouteSource) -> &'static str {
    match source {
        RouteSource::Table => "by the routing table",
        RouteSource::StreetOverride => "by the street's override",
        RouteSource::Fallback => "by the route's fallback",
        RouteSource::Street => "back to the street, no fallback left",
        RouteSource::Manual => "chosen by a person",
    }
}

fn reject_reason(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::OutsideJurisdiction => "outside the jurisdiction",
        RejectReason::NotAGovernmentMatter => "not a government matter",
        RejectReason::InsufficientInformation => "insufficient information",
        RejectReason::Malicious => "malicious",
    }
}

fn return_reason(reason: ReturnReason) -> &'static str {
    match reason {
        ReturnReason::NotOurDuty => "not our duty",
        ReturnReason::WrongLocation => "wrong location",
        ReturnReason::WrongCategory => "wrong category",
    }
}

fn satisfaction_text(satisfaction: Satisfaction) -> &'static str {
    match satisfaction {
        Satisfaction::Satisfied => "satisfied (满意)",
        Satisfaction::BasicallySatisfied => "basically satisfied (基本满意)",
        Satisfaction::Unsatisfied => "unsatisfied (不满意)",
    }
}
