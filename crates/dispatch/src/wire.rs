//! Console commands and replies (JSON over NATS request/reply) and notifications.
//!
//! A command is a request on `dispatch.cmd.<scope>.<action>`, where the scope names the
//! acting role: `department.<id>` (e.g. `dispatch.cmd.department.chengguan.acknowledge`),
//! `grid_worker`, `community`, `street`, `district`, `city` or `resident`:
//!
//! ```json
//! {"command_id":"console-7/0193..","incident":"0193..-..","actor":{"id":"..."},
//!  "note":"..","reason":"..","minutes":60,"approve":true,"passed":true,
//!  "satisfaction":"satisfied","reopen":false,"return_reason":"not_our_duty"}
//! ```
//!
//! (only the fields the action needs). The role is taken from the subject, never from the
//! body, so NATS permissions on subjects decide who may act as which department: a console
//! whose credentials may publish only `dispatch.cmd.department.chengguan.>` cannot act as
//! another department, and the domain refuses it a case that is not chengguan's. A body may
//! still say `"role"`; when it names another role than the subject the command is refused
//! (`actor_mismatch`). The reply is `{"status":"accepted",..}`,
//! `{"status":"rejected","reason_code":..,"message":..}` for a business refusal (nothing was
//! written), or `{"status":"error",..}` when the store could not be reached.

use domain::incident::{Action, ReturnReason, Satisfaction};
use domain::{Actor, ActorId, IncidentId, Rejection, Role};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Prefix of command subjects: `dispatch.cmd.<scope>.<action>`.
pub const SUBJECT_COMMAND_PREFIX: &str = "dispatch.cmd.";
/// Wildcard the service subscribes to (queue group).
pub const SUBJECT_COMMANDS: &str = "dispatch.cmd.>";
/// Scope token of department subjects (`dispatch.cmd.department.<id>.<action>`).
pub const SCOPE_DEPARTMENT: &str = "department";
/// Scope tokens of the roles that are not departments (one token each).
pub const SCOPES_OTHER: &[&str] = &[
    "grid_worker",
    "community",
    "street",
    "district",
    "city",
    "resident",
];
/// Largest command request body.
pub const REQUEST_BYTES_MAX: usize = 16 * 1024;
/// Longest console command id.
pub const COMMAND_ID_BYTES_MAX: usize = 128;

/// The actions consoles may send, by subject token.
pub const ACTIONS: &[&str] = &[
    "acknowledge",
    "resolve",
    "return",
    "request_extension",
    "approve_extension",
    "blow_whistle",
    "report_to_whistle",
    "verify",
    "rate",
];

/// Who acts: a person's id (a UUID, also for a grid worker) and, optionally, the role the
/// subject already names.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ActorJson {
    /// Optional, and only checked: the role is the subject's scope. When present it must be
    /// the same role (`resident`, `grid_worker`, `community`, `street`, `district`, `city` or
    /// `department:<id>`).
    #[serde(default)]
    pub role: Option<String>,
    pub id: uuid::Uuid,
}

/// A console command, the body of `dispatch.cmd.<scope>.<action>`: the action's fields are
/// the ones it needs (`resolve`: `note`; `return`: `return_reason`, `reason`;
/// `request_extension`: `minutes`, `reason`; `approve_extension`: `approve`; `verify`:
/// `passed`, `note`; `rate`: `satisfaction`, `reopen`; `blow_whistle`: `reason`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// Idempotency key, required (1 to 128 bytes): resending the same command id writes
    /// nothing new and gets the first answer, so a console may resend after a lost reply.
    #[schemars(length(min = 1, max = 128))]
    pub command_id: String,
    pub incident: uuid::Uuid,
    pub actor: Option<ActorJson>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub minutes: Option<u32>,
    #[serde(default)]
    pub approve: Option<bool>,
    #[serde(default)]
    pub passed: Option<bool>,
    /// `satisfied`, `basically_satisfied`, `unsatisfied`.
    #[serde(default)]
    pub satisfaction: Option<String>,
    #[serde(default)]
    pub reopen: Option<bool>,
    /// `not_our_duty`, `wrong_location`, `wrong_category`.
    #[serde(default)]
    pub return_reason: Option<String>,
}

/// A reply to a console command: `accepted` (stored, or a duplicate of a stored command),
/// `rejected` (a business refusal, nothing written; `reason_code` is stable) or `error` (the
/// store could not be reached; send again with the same `command_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CommandReply {
    Accepted {
        incident: uuid::Uuid,
        /// The incident's version after the commit.
        version: u64,
        /// Stream sequence of the commit.
        sequence: u64,
        /// True when this command id was already stored (nothing new written).
        duplicate: bool,
        /// Event type names of the commit (empty for a duplicate).
        events: Vec<String>,
    },
    Rejected {
        /// A business refusal (`domain::Rejection` in snake_case, `actor_mismatch`,
        /// `unknown_action`, ...), or a request that cannot be read: `malformed_json`,
        /// `schema_violation` (also a missing field the action needs, or a command id that
        /// is empty or over 128 bytes), `payload_too_large` (the codes every service shares).
        reason_code: String,
        message: String,
    },
    Error {
        reason_code: String,
        message: String,
    },
}

impl CommandReply {
    pub fn rejected(reason_code: &str, message: impl Into<String>) -> CommandReply {
        CommandReply::Rejected {
            reason_code: reason_code.to_owned(),
            message: message.into(),
        }
    }

    pub fn error(reason_code: &str, message: impl Into<String>) -> CommandReply {
        CommandReply::Error {
            reason_code: reason_code.to_owned(),
            message: message.into(),
        }
    }

    pub fn from_rejection(rejection: &Rejection) -> CommandReply {
        CommandReply::rejected(&rejection_code(rejection), rejection.to_string())
    }
}

/// `snake_case` of the rejection's variant, e.g. `not_assigned`.
pub fn rejection_code(rejection: &Rejection) -> String {
    let name = match serde_json::to_value(rejection) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(serde_json::Value::Object(map)) => map.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let mut code = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                code.push('_');
            }
            code.push(c.to_ascii_lowercase());
        } else {
            code.push(c);
        }
    }
    code
}

pub fn parse_role(text: &str) -> Result<Role, String> {
    Ok(match text {
        "resident" => Role::Resident,
        "grid_worker" => Role::GridWorker,
        "community" => Role::Community,
        "street" => Role::Street,
        "district" => Role::District,
        "city" => Role::City,
        other => match other.strip_prefix("department:") {
            Some(id) => Role::Department(id.parse().map_err(|e| format!("{e}"))?),
            None => return Err(format!("unknown role {other:?}")),
        },
    })
}

/// The subject a console sends `action` to when acting as `role`; `None` for `System`, which
/// consoles may never claim.
pub fn command_subject(role: &Role, action: &str) -> Option<String> {
    let scope = match role {
        Role::Department(id) => format!("{SCOPE_DEPARTMENT}.{id}"),
        Role::Resident => "resident".to_owned(),
        Role::GridWorker => "grid_worker".to_owned(),
        Role::Community => "community".to_owned(),
        Role::Street => "street".to_owned(),
        Role::District => "district".to_owned(),
        Role::City => "city".to_owned(),
        Role::System => return None,
    };
    Some(format!("{SUBJECT_COMMAND_PREFIX}{scope}.{action}"))
}

/// Splits a command subject into the acting role and the action token.
pub fn parse_subject(subject: &str) -> Result<(Role, &str), CommandReply> {
    let unknown = || {
        CommandReply::rejected(
            "unknown_subject",
            format!(
                "{subject:?} is not {SUBJECT_COMMAND_PREFIX}department.<id>.<action> or \
                 {SUBJECT_COMMAND_PREFIX}<{}>.<action>",
                SCOPES_OTHER.join("|")
            ),
        )
    };
    let rest = subject
        .strip_prefix(SUBJECT_COMMAND_PREFIX)
        .ok_or_else(unknown)?;
    let tokens: Vec<&str> = rest.split('.').collect();
    match tokens.as_slice() {
        [SCOPE_DEPARTMENT, id, action] => {
            let role = parse_role(&format!("department:{id}"))
                .map_err(|e| CommandReply::rejected("bad_role", e))?;
            Ok((role, action))
        }
        [scope, action] if SCOPES_OTHER.contains(scope) => {
            let role = parse_role(scope).map_err(|e| CommandReply::rejected("bad_role", e))?;
            Ok((role, action))
        }
        _ => Err(unknown()),
    }
}

/// A parsed console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleCommand {
    pub command_id: String,
    pub incident: IncidentId,
    pub actor: Actor,
    pub action: Action,
}

fn need<T>(value: Option<T>, field: &str, action: &str) -> Result<T, CommandReply> {
    value.ok_or_else(|| {
        CommandReply::rejected(
            observe::refusal::SCHEMA_VIOLATION,
            format!("{action} needs the field {field:?}"),
        )
    })
}

/// Parses a request on `subject` (see [`parse_subject`]). The actor's role is the subject's;
/// consoles can never act as `System`.
pub fn parse_command(subject: &str, payload: &[u8]) -> Result<ConsoleCommand, CommandReply> {
    let (role, action) = parse_subject(subject)?;
    parse_command_as(role, action, payload)
}

/// Parses a command body for `role` (already taken from the subject) and `action`.
pub fn parse_command_as(
    role: Role,
    action: &str,
    payload: &[u8],
) -> Result<ConsoleCommand, CommandReply> {
    let request: CommandRequest =
        observe::refusal::parse_json("command", payload, REQUEST_BYTES_MAX)
            .map_err(|refusal| CommandReply::rejected(refusal.reason_code, refusal.message))?;
    if request.command_id.is_empty() || request.command_id.len() > COMMAND_ID_BYTES_MAX {
        return Err(CommandReply::rejected(
            observe::refusal::SCHEMA_VIOLATION,
            format!("command id must be 1..={COMMAND_ID_BYTES_MAX} bytes"),
        ));
    }
    let actor_json = need(request.actor.clone(), "actor", action)?;
    if let Some(claimed) = &actor_json.role
        && *claimed != role.to_string()
    {
        return Err(CommandReply::rejected(
            "actor_mismatch",
            format!("the body claims role {claimed:?} on a subject of role \"{role}\""),
        ));
    }
    let actor = Actor {
        role,
        id: ActorId(actor_json.id),
    };
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let action_value = match action {
        "acknowledge" => Action::Acknowledge,
        "resolve" => Action::Resolve {
            note: text(&request.note),
        },
        "return" => Action::ReturnNotOurs {
            reason: match need(request.return_reason.as_deref(), "return_reason", action)? {
                "not_our_duty" => ReturnReason::NotOurDuty,
                "wrong_location" => ReturnReason::WrongLocation,
                "wrong_category" => ReturnReason::WrongCategory,
                other => {
                    return Err(CommandReply::rejected(
                        "bad_return_reason",
                        format!("unknown return reason {other:?}"),
                    ));
                }
            },
            note: text(&request.note),
        },
        "request_extension" => Action::RequestExtension {
            minutes: need(request.minutes, "minutes", action)?,
            reason: text(&request.reason),
        },
        "approve_extension" => Action::DecideExtension {
            approve: need(request.approve, "approve", action)?,
            note: text(&request.note),
        },
        "blow_whistle" => Action::DeclareBeyondPowers {
            reason: text(&request.reason),
        },
        "report_to_whistle" => Action::ReportToWhistle,
        "verify" => Action::Verify {
            passed: need(request.passed, "passed", action)?,
            note: text(&request.note),
        },
        "rate" => Action::Rate {
            satisfaction: match need(request.satisfaction.as_deref(), "satisfaction", action)? {
                "satisfied" => Satisfaction::Satisfied,
                "basically_satisfied" => Satisfaction::BasicallySatisfied,
                "unsatisfied" => Satisfaction::Unsatisfied,
                other => {
                    return Err(CommandReply::rejected(
                        "bad_satisfaction",
                        format!("unknown satisfaction {other:?}"),
                    ));
                }
            },
            reopen: request.reopen.unwrap_or(false),
        },
        other => {
            return Err(CommandReply::rejected(
                "unknown_action",
                format!("no console action {other:?}; one of {ACTIONS:?}"),
            ));
        }
    };
    Ok(ConsoleCommand {
        command_id: request.command_id,
        incident: IncidentId(request.incident),
        actor,
        action: action_value,
    })
}

/// The JSON Schemas of dispatch's public messages, by file stem (`schemas/<stem>.schema.json`).
pub fn schemas() -> Vec<(&'static str, schemars::schema::RootSchema)> {
    use schemars::schema_for;
    vec![
        ("dispatch_command", schema_for!(CommandRequest)),
        ("dispatch_command_reply", schema_for!(CommandReply)),
        (
            "dispatch_notification",
            schema_for!(crate::notify::Notification),
        ),
    ]
}
