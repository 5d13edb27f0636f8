//! Department consoles, grid workers, community and street offices: they read their
//! notifications from the NOTIFICATIONS stream and answer through `dispatch.cmd.<scope>.<action>`
//! — promptly, slowly or not at all, as the plan says, so that whistles blow where they should.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{AckKind, consumer};
use dispatch::Notification;
use dispatch::notify::NOTIFICATIONS_STREAM;
use futures::StreamExt as _;
use partition::synthetic::SplitMix64;
use serde_json::json;
use tokio::sync::{Semaphore, watch};

use crate::residents::Residents;
use crate::{SimulationError, request_json};

/// Console actions waiting or running at once; beyond it, notifications wait in the stream.
pub const ACTIONS_IN_FLIGHT_MAX: usize = 2_048;
/// Notifications per pull request.
const NOTIFICATIONS_BATCH_MAX: usize = 256;
/// Cases remembered as acknowledged by their handler console (see `Consoles::acknowledged`);
/// past it, a late report of such a handler counts as refused.
const ACKNOWLEDGED_REMEMBERED_MAX: usize = 1_000_000;
/// Pause between two reads of an incident view while a handler waits for summoned reports.
const SUMMONS_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How one console answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Acknowledges at once, resolves soon after, reports to every whistle.
    Prompt,
    /// Answers, but only after `ConsolePlan::slow_delay`: its deadlines pass first.
    Slow,
    /// Never answers: the whistle climbs the ladder.
    Silent,
}

/// Who answers how.
#[derive(Debug, Clone)]
pub struct ConsolePlan {
    pub seed: u64,
    /// Department id -> behaviour; departments not listed are prompt.
    pub departments: BTreeMap<String, Behaviour>,
    pub grid_workers: Behaviour,
    pub communities: Behaviour,
    pub streets: Behaviour,
    /// Wall-clock pause before a prompt console acknowledges or reports.
    pub prompt_delay: Duration,
    /// Wall-clock pause between acknowledging and resolving.
    pub work_delay: Duration,
    /// Wall-clock pause before a slow console does anything.
    pub slow_delay: Duration,
    /// Durable consumer name of this set of consoles (one set per simulation).
    pub durable_name: String,
    /// Before resolving, a handler waits at most this long until every summoned department
    /// that answers at all (not [`Behaviour::Silent`]) has reported to the whistle: 部门报到
    /// comes before the case is done. It reads the projection's incident view, at least as
    /// new as the notification. Zero: resolve without looking (the handler and the summoned
    /// departments then race, and which comes first depends on timing).
    pub summons_wait: Duration,
}

impl ConsolePlan {
    /// Every department of the policy, a seeded share of them slow or silent.
    pub fn seeded(
        seed: u64,
        policy: &domain::Policy,
        slow_share: f64,
        silent_share: f64,
    ) -> ConsolePlan {
        let mut rng = SplitMix64::new(seed ^ 0x00c0_501e);
        let departments = policy
            .routing
            .departments()
            .map(|department| {
                let roll = rng.unit();
                let behaviour = if roll < silent_share {
                    Behaviour::Silent
                } else if roll < silent_share + slow_share {
                    Behaviour::Slow
                } else {
                    Behaviour::Prompt
                };
                (department.id.to_string(), behaviour)
            })
            .collect();
        ConsolePlan {
            seed,
            departments,
            grid_workers: Behaviour::Prompt,
            communities: Behaviour::Prompt,
            streets: Behaviour::Prompt,
            prompt_delay: Duration::from_millis(300),
            work_delay: Duration::from_secs(2),
            slow_delay: Duration::from_secs(15),
            durable_name: format!("simulated-consoles-{seed}"),
            summons_wait: Duration::ZERO,
        }
    }
}

/// What the consoles did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsoleStats {
    pub notifications: BTreeMap<String, u64>,
    pub accepted: BTreeMap<String, u64>,
    /// `<action>:<reason_code>` -> count. Some refusals are expected: a slow console that
    /// acknowledges a case already taken away from it gets `not_assigned`.
    pub rejected: BTreeMap<String, u64>,
    /// `<action>` -> count of commands refused because what they ask is already so: a
    /// handler department summoned by a whistle has reported to it by acknowledging, so its
    /// own `report_to_whistle` finds the report made (or, arriving after it resolved the
    /// case, the case moved on). Not a refusal of the console's work.
    pub already_done: BTreeMap<String, u64>,
    pub failed: u64,
}

/// A running set of consoles.
#[derive(Debug, Clone)]
pub struct Consoles {
    stats: Arc<Mutex<ConsoleStats>>,
    /// Answers being waited for or sent.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// (incident, console scope) of every case a console acknowledged as its handler: its
    /// acknowledgement answered the whistle's summons too (see `ConsoleStats::already_done`).
    acknowledged: Arc<Mutex<std::collections::HashSet<(uuid::Uuid, String)>>>,
    consumer: consumer::PullConsumer,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One answer a console gives: the subject scope and action, after a pause.
#[derive(Debug, Clone)]
struct Step {
    scope: String,
    action: &'static str,
    actor: uuid::Uuid,
    extra: serde_json::Value,
    after: Duration,
}

impl Consoles {
    pub fn stats(&self) -> ConsoleStats {
        lock(&self.stats).clone()
    }

    /// Work not done yet: answers in flight plus notifications not yet read or acknowledged.
    /// Zero means the consoles have nothing left to do (until dispatch notifies again).
    pub async fn backlog(&self) -> Result<u64, SimulationError> {
        let mut consumer = self.consumer.clone();
        let info = consumer
            .info()
            .await
            .map_err(|error| SimulationError::Bus {
                context: "read the consoles' consumer".to_owned(),
                reason: error.to_string(),
            })?;
        let in_flight = self.in_flight.load(std::sync::atomic::Ordering::SeqCst) as u64;
        Ok(in_flight + info.num_pending + info.num_ack_pending as u64)
    }

    /// Starts reading notifications (from the beginning of the stream: a console that was
    /// offline catches up) and answering them, until `stop`.
    pub async fn start(
        client: &async_nats::Client,
        plan: ConsolePlan,
        residents: Residents,
        stop: watch::Receiver<bool>,
    ) -> Result<
        (
            Consoles,
            tokio::task::JoinHandle<Result<(), SimulationError>>,
        ),
        SimulationError,
    > {
        let jetstream = async_nats::jetstream::new(client.clone());
        let bus = |context: &str, error: String| SimulationError::Bus {
            context: context.to_owned(),
            reason: error,
        };
        let stream = jetstream
            .get_stream(NOTIFICATIONS_STREAM)
            .await
            .map_err(|error| bus("open the NOTIFICATIONS stream", error.to_string()))?;
        let consumer = stream
            .get_or_create_consumer(
                &plan.durable_name,
                consumer::pull::Config {
                    durable_name: Some(plan.durable_name.clone()),
                    filter_subject: format!("{}.>", dispatch::notify::NOTIFY_SUBJECT_PREFIX),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| bus("create the consoles' consumer", error.to_string()))?;
        let consoles = Consoles {
            stats: Arc::new(Mutex::new(ConsoleStats::default())),
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            acknowledged: Arc::new(Mutex::new(std::collections::HashSet::new())),
            consumer,
        };
        let this = consoles.clone();
        let client = client.clone();
        let task = tokio::spawn(async move {
            let served = this.serve(client, plan, residents, stop).await;
            if let Err(error) = &served {
                tracing::error!(error = %error, "simulated consoles stopped");
            }
            served
        });
        Ok((consoles, task))
    }

    async fn serve(
        &self,
        client: async_nats::Client,
        plan: ConsolePlan,
        residents: Residents,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), SimulationError> {
        let permits = Arc::new(Semaphore::new(ACTIONS_IN_FLIGHT_MAX));
        let plan = Arc::new(plan);
        loop {
            let mut messages = self
                .consumer
                .stream()
                .max_messages_per_batch(NOTIFICATIONS_BATCH_MAX)
                .messages()
                .await
                .map_err(|error| SimulationError::Bus {
                    context: "read notifications".to_owned(),
                    reason: error.to_string(),
                })?;
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = stop.changed() => return Ok(()),
                };
                let message = match message {
                    Some(Ok(message)) => message,
                    // The pull stream ended or the server restarted: pull again.
                    Some(Err(error)) => {
                        tracing::debug!(error = %error, "notification stream interrupted");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                    None => break,
                };
                let notification: Notification = match serde_json::from_slice(&message.payload) {
                    Ok(notification) => notification,
                    Err(error) => {
                        tracing::warn!(error = %error, "undecodable notification");
                        let _ = message.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                *lock(&self.stats)
                    .notifications
                    .entry(notification.kind.clone())
                    .or_default() += 1;
                let steps = answer(&plan, &notification, &residents);
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let this = self.clone();
                let client = client.clone();
                let plan = plan.clone();
                self.in_flight
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Acknowledged once the answer is scheduled: the backlog counts it from here.
                let _ = message.ack().await;
                tokio::spawn(async move {
                    this.perform(&client, &plan, &notification, steps).await;
                    this.in_flight
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    drop(permit);
                });
            }
        }
    }

    async fn perform(
        &self,
        client: &async_nats::Client,
        plan: &ConsolePlan,
        notification: &Notification,
        steps: Vec<Step>,
    ) {
        for step in steps {
            tokio::time::sleep(step.after).await;
            if step.action == "resolve" && !plan.summons_wait.is_zero() {
                await_summoned_reports(client, plan, notification).await;
            }
            let mut body = json!({
                // One id per recipient: two departments summoned by one whistle get the
                // same notification kind at the same version.
                "command_id": format!(
                    "sim/{}/{}/{}/{}/{}",
                    notification.incident.simple(),
                    notification.kind,
                    notification.version,
                    step.scope,
                    step.action
                ),
                "incident": notification.incident,
                "actor": {"id": step.actor},
            });
            if let (Some(body), Some(extra)) = (body.as_object_mut(), step.extra.as_object()) {
                for (key, value) in extra {
                    body.insert(key.clone(), value.clone());
                }
            }
            let subject = format!("dispatch.cmd.{}.{}", step.scope, step.action);
            match request_json(client, &subject, &body).await {
                Ok(reply) if reply["status"] == "accepted" => {
                    if step.action == "acknowledge" {
                        let mut acknowledged = lock(&self.acknowledged);
                        if acknowledged.len() < ACKNOWLEDGED_REMEMBERED_MAX {
                            acknowledged.insert((notification.incident, step.scope.clone()));
                        }
                    }
                    *lock(&self.stats)
                        .accepted
                        .entry(step.action.to_owned())
                        .or_default() += 1;
                }
                // The report is already made (the handler's acknowledgement made it), or,
                // for a console that acknowledged the case as its handler, moot once it
                // resolved the case: its acknowledgement was its report.
                Ok(reply)
                    if step.action == "report_to_whistle"
                        && (reply["reason_code"] == "already_reported_to_whistle"
                            || (reply["reason_code"] == "invalid_transition"
                                && lock(&self.acknowledged)
                                    .contains(&(notification.incident, step.scope.clone())))) =>
                {
                    *lock(&self.stats)
                        .already_done
                        .entry(step.action.to_owned())
                        .or_default() += 1;
                }
                Ok(reply) => {
                    let code = reply["reason_code"].as_str().unwrap_or("unknown");
                    *lock(&self.stats)
                        .rejected
                        .entry(format!("{}:{code}", step.action))
                        .or_default() += 1;
                    // A refused step makes the rest of the plan pointless.
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %error, subject, "console command failed");
                    lock(&self.stats).failed += 1;
                    return;
                }
            }
        }
    }
}

/// Waits (at most `plan.summons_wait`) until the projection's view of the incident, at least
/// as new as `notification`, shows no summons pending on a department that answers.
async fn await_summoned_reports(
    client: &async_nats::Client,
    plan: &ConsolePlan,
    notification: &Notification,
) {
    let deadline = tokio::time::Instant::now() + plan.summons_wait;
    let query = json!({"incident_id": notification.incident.to_string()});
    loop {
        let settled = match request_json(client, "projection.query.incident", &query).await {
            Ok(reply) => summons_settled(plan, &reply, notification.version),
            Err(error) => {
                tracing::debug!(error = %error, "incident view unavailable");
                false
            }
        };
        if settled || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(SUMMONS_POLL_INTERVAL).await;
    }
}

/// Whether a `projection.query.incident` reply shows the incident at `version` or later
/// with no summons pending on a department that answers.
fn summons_settled(plan: &ConsolePlan, reply: &serde_json::Value, version: u64) -> bool {
    let view = &reply["value"];
    if reply["status"] != "found" || view["version"].as_u64().unwrap_or(0) < version {
        return false;
    }
    let Some(summons) = view["whistle"]["summons"].as_array() else {
        return true;
    };
    summons.iter().all(|summons| {
        let department = summons["department"].as_str().unwrap_or("");
        summons["state"] != "pending"
            || plan.departments.get(department) == Some(&Behaviour::Silent)
    })
}

/// A stable actor id for a console (FNV-1a of its name).
fn actor_for(name: &str) -> uuid::Uuid {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    uuid::Uuid::from_u64_pair(0x5157_c0de, hash)
}

/// What the recipient of `notification` does about it.
fn answer(plan: &ConsolePlan, notification: &Notification, residents: &Residents) -> Vec<Step> {
    let tokens: Vec<&str> = notification.recipient.split('.').collect();
    // dispatch.notify.<kind>.<id>
    let (kind, id) = match tokens.as_slice() {
        [_, _, kind, id] => (*kind, *id),
        _ => return Vec::new(),
    };
    let (scope, behaviour) = match kind {
        "department" => (
            format!("department.{id}"),
            plan.departments
                .get(id)
                .copied()
                .unwrap_or(Behaviour::Prompt),
        ),
        "grid" => ("grid_worker".to_owned(), plan.grid_workers),
        "community" => ("community".to_owned(), plan.communities),
        "street" => ("street".to_owned(), plan.streets),
        _ => return Vec::new(),
    };
    let first = match behaviour {
        Behaviour::Silent => return Vec::new(),
        Behaviour::Prompt => plan.prompt_delay,
        Behaviour::Slow => plan.slow_delay,
    };
    let actor = actor_for(&notification.recipient);
    let step = |action: &'static str, extra: serde_json::Value, after: Duration| Step {
        scope: scope.clone(),
        action,
        actor,
        extra,
        after,
    };
    match notification.kind.as_str() {
        "assigned" | "verification_failed" => {
            let mut steps = Vec::new();
            if notification.kind == "assigned" {
                steps.push(step("acknowledge", json!({}), first));
            }
            steps.push(step(
                "resolve",
                json!({"note": "处理完毕（模拟）"}),
                if notification.kind == "assigned" {
                    plan.work_delay
                } else {
                    first
                },
            ));
            steps
        }
        "summoned" => vec![step("report_to_whistle", json!({}), first)],
        "to_verify" => {
            let mut steps = vec![step(
                "verify",
                json!({"passed": true, "note": "现场核实"}),
                first,
            )];
            if let Some(reporter) = residents.reporter_of(notification.incident) {
                // The resident rates the handling once the case is verified.
                let mut rng = SplitMix64::new(plan.seed ^ notification.incident.as_u64_pair().1);
                let satisfaction = match rng.range(0, 19) {
                    0..=14 => "satisfied",
                    15..=17 => "basically_satisfied",
                    _ => "unsatisfied",
                };
                steps.push(Step {
                    scope: "resident".to_owned(),
                    action: "rate",
                    actor: reporter,
                    extra: json!({"satisfaction": satisfaction, "reopen": false}),
                    after: plan.prompt_delay,
                });
            }
            steps
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `summons_settled` on a reply of `projection.query.incident`, for a plan where
    /// department `silent` never answers.
    fn check(reply: serde_json::Value, version: u64, expect: bool) {
        let mut plan =
            ConsolePlan::seeded(1, &domain::Policy::embedded("sanming").unwrap(), 0.0, 0.0);
        plan.departments
            .insert("silent".to_owned(), Behaviour::Silent);
        assert_eq!(summons_settled(&plan, &reply, version), expect, "{reply}");
    }

    fn view(version: u64, summons: &[(&str, &str)]) -> serde_json::Value {
        let summons: Vec<_> = summons
            .iter()
            .map(|(department, state)| json!({"department": department, "state": state}))
            .collect();
        json!({"status": "found", "value": {"version": version, "whistle": {"summons": summons}}})
    }

    #[test]
    fn a_handler_waits_for_reports_of_departments_that_answer() {
        check(json!({"status": "not_found"}), 1, false);
        check(view(3, &[]), 4, false); // the view is older than the notification
        check(
            json!({"status": "found", "value": {"version": 4, "whistle": null}}),
            4,
            true,
        );
        check(view(4, &[("a", "reported"), ("b", "missed")]), 4, true);
        check(view(5, &[("a", "reported"), ("b", "pending")]), 4, false);
        check(
            view(5, &[("a", "reported"), ("silent", "pending")]),
            4,
            true,
        );
    }
}
