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

/// The optional body fields each action reads (in [`ACTIONS`] order); a body with any other
/// of them is refused, so `{"reason":..}` on `return` (whose text is `note`) is not dropped.
const ACTION_FIELDS: [&[&str]; ACTIONS.len()] = [
    &[],
    &["note"],
    &["return_reason", "note"],
    &["minutes", "reason"],
    &["approve", "note"],
    &["reason"],
    &[],
    &["passed", "note"],
    &["satisfaction", "reopen"],
];

// The literal bounds in `CommandRequest`'s schema attributes are the domain's.
const _: () = assert!(
    domain::incident::NOTE_BYTES_MAX == 1000 && domain::incident::EXTENSION_MINUTES_MAX == 12600
);

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

/// A console command, the body of `dispatch.cmd.<scope>.<action>`. Besides `command_id`,
/// `incident` and `actor`, an action reads only its own fields, and a body with a field its
/// action does not read is refused `schema_violation` (a misplaced field is never ignored):
/// `acknowledge`, `report_to_whistle`: none; `resolve`: `note` (optional); `return`:
/// `return_reason`, `note` (both required); `request_extension`: `minutes` (1..=12,600),
/// `reason`; `approve_extension`: `approve`, `note` (optional); `blow_whistle`: `reason`;
/// `verify`: `passed`, `note` (required when not passed); `rate`: `satisfaction`, `reopen`
/// (optional). Free text (`note`, `reason`) is at most 1,000 bytes; where it is required it
/// must not be empty (`empty_text`, `text_too_long`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// Idempotency key, required (1 to 128 bytes): resending the same command id writes
    /// nothing new and gets the first answer, so a console may resend after a lost reply.
    /// Ids beginning `deadline:` or `dispatch:` are dispatch's own and refused.
    #[schemars(length(min = 1, max = 128))]
    pub command_id: String,
    pub incident: uuid::Uuid,
    pub actor: ActorJson,
    /// Free text, at most 1,000 bytes of UTF-8 (about 330 Chinese characters; the schema's
    /// `maxLength` counts characters, so it is the looser bound).
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub note: Option<String>,
    /// Free text, at most 1,000 bytes of UTF-8, as `note`.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub reason: Option<String>,
    /// Minutes of extension asked for, on the handler's clock.
    #[serde(default)]
    #[schemars(range(min = 1, max = 12600))]
    pub minutes: Option<u32>,
    #[serde(default)]
    pub approve: Option<bool>,
    #[serde(default)]
    pub passed: Option<bool>,
    #[serde(default)]
    pub satisfaction: Option<SatisfactionJson>,
    #[serde(default)]
    pub reopen: Option<bool>,
    #[serde(default)]
    pub return_reason: Option<ReturnReasonJson>,
}

/// A resident's rating of how a closed case was handled (满意, 基本满意, 不满意).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SatisfactionJson {
    Satisfied,
    BasicallySatisfied,
    Unsatisfied,
}

/// Why a handler gives a case back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReturnReasonJson {
    NotOurDuty,
    WrongLocation,
    WrongCategory,
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

/// Command id prefixes of the commits dispatch stores itself: an escalation
/// (`deadline:<incident>:<deadline ms>`) and a dispatch by the routing table
/// (`dispatch:<incident>`). A console may not use them: a console commit stored under such an
/// id would make the server drop dispatch's own commit as its repeat (Msg-Id) for as long as
/// the duplicate window lasts.
pub const SYSTEM_COMMAND_ID_PREFIXES: [&str; 2] =
    [DEADLINE_COMMAND_ID_PREFIX, DISPATCH_COMMAND_ID_PREFIX];
/// Command id prefix of an escalation dispatch stores (`deadline:<incident>:<deadline ms>`).
pub const DEADLINE_COMMAND_ID_PREFIX: &str = "deadline:";
/// Command id prefix of a dispatch by the routing table (`dispatch:<incident>`).
pub const DISPATCH_COMMAND_ID_PREFIX: &str = "dispatch:";

/// Parses a command body for `role` (already taken from the subject) and `action`.
pub fn parse_command_as(
    role: Role,
    action: &str,
    payload: &[u8],
) -> Result<ConsoleCommand, CommandReply> {
    let request: CommandRequest =
        observe::refusal::parse_json("command", payload, REQUEST_BYTES_MAX)
            .map_err(|refusal| CommandReply::rejected(refusal.reason_code, refusal.message))?;
    if request.command_id.is_empty()
        || request.command_id.len() > COMMAND_ID_BYTES_MAX
        || request.command_id.chars().any(char::is_control)
        || request.command_id.trim() != request.command_id
    {
        return Err(CommandReply::rejected(
            observe::refusal::SCHEMA_VIOLATION,
            format!(
                "command id must be 1..={COMMAND_ID_BYTES_MAX} bytes without control characters \
                 or white space at either end"
            ),
        ));
    }
    if let Some(prefix) = SYSTEM_COMMAND_ID_PREFIXES
        .iter()
        .find(|prefix| request.command_id.starts_with(**prefix))
    {
        return Err(CommandReply::rejected(
            observe::refusal::SCHEMA_VIOLATION,
            format!("command ids beginning {prefix:?} are dispatch's own; choose another"),
        ));
    }
    let Some(action_index) = ACTIONS.iter().position(|known| *known == action) else {
        return Err(CommandReply::rejected(
            "unknown_action",
            format!("no console action {action:?}; one of {ACTIONS:?}"),
        ));
    };
    let present = [
        ("note", request.note.is_some()),
        ("reason", request.reason.is_some()),
        ("minutes", request.minutes.is_some()),
        ("approve", request.approve.is_some()),
        ("passed", request.passed.is_some()),
        ("satisfaction", request.satisfaction.is_some()),
        ("reopen", request.reopen.is_some()),
        ("return_reason", request.return_reason.is_some()),
    ];
    let fields = ACTION_FIELDS[action_index];
    if let Some((field, _)) = present
        .iter()
        .find(|(field, is_present)| *is_present && !fields.contains(field))
    {
        return Err(CommandReply::rejected(
            observe::refusal::SCHEMA_VIOLATION,
            format!("{action} does not read the field {field:?}; it reads {fields:?}"),
        ));
    }
    let actor_json = &request.actor;
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
            reason: match need(request.return_reason, "return_reason", action)? {
                ReturnReasonJson::NotOurDuty => ReturnReason::NotOurDuty,
                ReturnReasonJson::WrongLocation => ReturnReason::WrongLocation,
                ReturnReasonJson::WrongCategory => ReturnReason::WrongCategory,
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
            satisfaction: match need(request.satisfaction, "satisfaction", action)? {
                SatisfactionJson::Satisfied => Satisfaction::Satisfied,
                SatisfactionJson::BasicallySatisfied => Satisfaction::BasicallySatisfied,
                SatisfactionJson::Unsatisfied => Satisfaction::Unsatisfied,
            },
            reopen: request.reopen.unwrap_or(false),
        },
        other => unreachable!("{other:?} is in ACTIONS but has no parser"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    /// Parses each `(action, body)` as a grid worker's command and prints the outcome.
    fn check(cases: &[(&str, serde_json::Value)], expect: Expect) {
        let actor = serde_json::json!({"id": uuid::Uuid::from_u128(7)});
        let incident = uuid::Uuid::from_u128(9);
        let text: String = cases
            .iter()
            .map(|(action, fields)| {
                let mut body = serde_json::json!({
                    "command_id": "c-1",
                    "incident": incident,
                    "actor": actor,
                });
                body.as_object_mut()
                    .unwrap()
                    .extend(fields.as_object().unwrap().clone());
                let outcome = match parse_command_as(
                    Role::GridWorker,
                    action,
                    &serde_json::to_vec(&body).unwrap(),
                ) {
                    Ok(command) => format!("{:?}", command.action),
                    Err(reply) => format!("{reply:?}"),
                };
                format!("{action} {fields}: {outcome}\n")
            })
            .collect();
        expect.assert_eq(&text);
    }

    #[test]
    fn each_action_reads_its_own_fields_and_refuses_others() {
        use serde_json::json;
        check(
            &[
                ("acknowledge", json!({})),
                ("resolve", json!({"note": "done"})),
                (
                    "return",
                    json!({"return_reason": "not_our_duty", "note": "gas"}),
                ),
                (
                    "return",
                    json!({"return_reason": "not_our_duty", "reason": "gas"}),
                ),
                (
                    "request_extension",
                    json!({"minutes": 60, "reason": "parts"}),
                ),
                ("approve_extension", json!({"approve": true})),
                ("blow_whistle", json!({"reason": "beyond us"})),
                ("report_to_whistle", json!({})),
                ("report_to_whistle", json!({"note": "here"})),
                ("verify", json!({"passed": false, "note": "still leaking"})),
                ("rate", json!({"satisfaction": "satisfied"})),
                ("rate", json!({"satisfaction": "thrilled"})),
                ("park", json!({})),
            ],
            expect![[r#"
                acknowledge {}: Acknowledge
                resolve {"note":"done"}: Resolve { note: "done" }
                return {"note":"gas","return_reason":"not_our_duty"}: ReturnNotOurs { reason: NotOurDuty, note: "gas" }
                return {"reason":"gas","return_reason":"not_our_duty"}: Rejected { reason_code: "schema_violation", message: "return does not read the field \"reason\"; it reads [\"return_reason\", \"note\"]" }
                request_extension {"minutes":60,"reason":"parts"}: RequestExtension { minutes: 60, reason: "parts" }
                approve_extension {"approve":true}: DecideExtension { approve: true, note: "" }
                blow_whistle {"reason":"beyond us"}: DeclareBeyondPowers { reason: "beyond us" }
                report_to_whistle {}: ReportToWhistle
                report_to_whistle {"note":"here"}: Rejected { reason_code: "schema_violation", message: "report_to_whistle does not read the field \"note\"; it reads []" }
                verify {"note":"still leaking","passed":false}: Verify { passed: false, note: "still leaking" }
                rate {"satisfaction":"satisfied"}: Rate { satisfaction: Satisfied, reopen: false }
                rate {"satisfaction":"thrilled"}: Rejected { reason_code: "schema_violation", message: "unknown variant `thrilled`, expected one of `satisfied`, `basically_satisfied`, `unsatisfied` at line 1 column 149" }
                park {}: Rejected { reason_code: "unknown_action", message: "no console action \"park\"; one of [\"acknowledge\", \"resolve\", \"return\", \"request_extension\", \"approve_extension\", \"blow_whistle\", \"report_to_whistle\", \"verify\", \"rate\"]" }
            "#]],
        );
    }

    #[test]
    fn a_body_without_an_actor_or_with_a_control_character_or_edge_space_in_its_id_is_refused() {
        let incident = uuid::Uuid::from_u128(9);
        let actor = serde_json::json!({"id": uuid::Uuid::from_u128(7)});
        let bodies = [
            serde_json::json!({"command_id": "c-1", "incident": incident}),
            serde_json::json!({"command_id": "c\n1", "incident": incident, "actor": actor}),
            // Typed with a trailing (full-width) space: NATS headers would drop it on reading.
            serde_json::json!({"command_id": "c1\u{3000}", "incident": incident, "actor": actor}),
            // The id of an escalation dispatch stores itself.
            serde_json::json!({"command_id": format!("deadline:{incident}:1795000000000"), "incident": incident, "actor": actor}),
        ];
        let text: String = bodies
            .iter()
            .map(|body| {
                let reply = parse_command_as(
                    Role::GridWorker,
                    "acknowledge",
                    &serde_json::to_vec(body).unwrap(),
                )
                .unwrap_err();
                format!("{reply:?}\n")
            })
            .collect();
        expect![[r#"
            Rejected { reason_code: "schema_violation", message: "missing field `actor` at line 1 column 70" }
            Rejected { reason_code: "schema_violation", message: "command id must be 1..=128 bytes without control characters or white space at either end" }
            Rejected { reason_code: "schema_violation", message: "command id must be 1..=128 bytes without control characters or white space at either end" }
            Rejected { reason_code: "schema_violation", message: "command ids beginning \"deadline:\" are dispatch's own; choose another" }
        "#]].assert_eq(&text);
    }
}
