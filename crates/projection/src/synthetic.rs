//! Seeded synthetic incident histories for tests and `wangge bench rebuild`: every commit is
//! decided by the real `domain::decide` (so the stream holds only legal lifecycles), with
//! late acknowledgements, missed deadlines, whistles, returns, failed verifications and
//! ratings mixed in by a seeded RNG.

use domain::incident::{Action, Handler, IncidentCommand, ReportState, Satisfaction, Status};
use domain::{
    Actor, ActorId, CategoryCode, GridCode, IncidentEvent, IncidentId, IncidentState, Policy, Role,
    Timestamp, decide, next_deadline,
};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

/// Most commits one synthetic incident may get.
pub const COMMITS_PER_INCIDENT_MAX: usize = 24;
/// 2026-05-06 10:00 (UTC+8), a working day.
pub const START_MS: i64 = 1_778_032_800_000;
const MINUTE_MS: i64 = 60_000;

/// One commit to append.
#[derive(Debug, Clone)]
pub struct PlannedCommit {
    pub incident: IncidentId,
    pub command_id: String,
    pub occurred_at_ms: i64,
    pub actor: String,
    pub events: Vec<IncidentEvent>,
}

/// The generator. Deterministic for a seed.
#[derive(Debug)]
pub struct Synthetic {
    policy: Policy,
    rng: ChaCha8Rng,
    grids: Vec<GridCode>,
    categories: Vec<CategoryCode>,
}

fn actor(role: Role, id: u128) -> Actor {
    Actor {
        role,
        id: ActorId(uuid::Uuid::from_u128(id)),
    }
}

fn role_of(handler: Handler) -> Role {
    match handler {
        Handler::GridWorker => Role::GridWorker,
        Handler::Community => Role::Community,
        Handler::Street => Role::Street,
        Handler::Department(d) => Role::Department(d),
    }
}

impl Synthetic {
    /// `grids`: grid codes to file incidents in (their streets must have routes in the
    /// Sanming table; `default_grids` gives some).
    pub fn new(seed: u64, grids: Vec<GridCode>) -> Synthetic {
        let policy = Policy::embedded("sanming").expect("the embedded Sanming policy parses");
        let street = grids
            .first()
            .map(|g| g.street())
            .unwrap_or_else(|| "350402001".parse().expect("street code"));
        let categories = policy
            .taxonomy
            .leaves()
            .map(|c| c.code)
            .filter(|code| policy.routing.route(*code, street).is_some())
            .collect();
        Synthetic {
            policy,
            rng: ChaCha8Rng::seed_from_u64(seed),
            grids,
            categories,
        }
    }

    /// `streets` x `communities` x `grids` grid codes in district 350402 (Sanming).
    pub fn default_grids(streets: u64, communities: u64, grids: u64) -> Vec<GridCode> {
        let mut codes = Vec::new();
        for street in 1..=streets {
            for community in 1..=communities {
                for grid in 1..=grids {
                    let value = 350_402_000_000_000 + street * 1_000_000 + community * 1_000 + grid;
                    codes.push(GridCode::new(value).expect("15 digits"));
                }
            }
        }
        codes
    }

    /// The whole life of incident number `n`, commit by commit.
    pub fn incident(&mut self, n: u64) -> Vec<PlannedCommit> {
        let incident = IncidentId(uuid::Uuid::from_u128(
            0x5eed_0000_0000_0000_u128 + u128::from(n),
        ));
        let reporter = actor(Role::Resident, 0x1_0000_0000 + u128::from(n));
        let system = actor(Role::System, 9);
        let grid = self.grids[self.rng.gen_range(0..self.grids.len())];
        let category = self.categories[self.rng.gen_range(0..self.categories.len())];
        let mut state = IncidentState::default();
        let mut now = START_MS + (n as i64) * 7_000;
        let mut commits = Vec::new();
        let mut step = 0usize;
        while commits.len() < COMMITS_PER_INCIDENT_MAX {
            step += 1;
            let roll: f64 = self.rng.r#gen();
            let handler = state.handler.unwrap_or(Handler::Street);
            let pending_summons = state
                .whistle
                .as_ref()
                .and_then(|w| w.summons.iter().find(|s| s.state == ReportState::Pending))
                .map(|s| s.department);
            now += self.rng.gen_range(1..90) * MINUTE_MS;
            let due = next_deadline(&state).map(|t| t.0);
            let (who, action) = match state.status {
                Status::Absent => (
                    reporter,
                    Action::Report {
                        incident,
                        description: "synthetic report".to_owned(),
                        position: None,
                        category_hint: None,
                    },
                ),
                Status::Reported if roll < 0.03 => (
                    system,
                    Action::RejectReport {
                        reason: domain::incident::RejectReason::InsufficientInformation,
                        note: "no location".to_owned(),
                    },
                ),
                Status::Reported => (system, Action::File { grid, category }),
                Status::Filed => (system, Action::Dispatch { to: None }),
                Status::Dispatched | Status::Acknowledged
                    if pending_summons.is_some() && roll < 0.5 =>
                {
                    let department = pending_summons.expect("checked");
                    (
                        actor(Role::Department(department), 77),
                        Action::ReportToWhistle,
                    )
                }
                Status::Dispatched | Status::Acknowledged if roll < 0.2 && due.is_some() => {
                    now = now.max(due.expect("checked") + MINUTE_MS);
                    (system, Action::DeadlineElapsed)
                }
                Status::Dispatched if roll < 0.27 && matches!(handler, Handler::Department(_)) => (
                    actor(role_of(handler), 55),
                    Action::ReturnNotOurs {
                        reason: domain::incident::ReturnReason::NotOurDuty,
                        note: "not ours".to_owned(),
                    },
                ),
                Status::Dispatched => (actor(role_of(handler), 55), Action::Acknowledge),
                Status::Acknowledged => (
                    actor(role_of(handler), 55),
                    Action::Resolve {
                        note: "done".to_owned(),
                    },
                ),
                Status::Resolved => (
                    actor(Role::GridWorker, 66),
                    Action::Verify {
                        passed: roll < 0.9,
                        note: "checked on site".to_owned(),
                    },
                ),
                Status::Closed if state.rating.is_none() && roll < 0.7 => {
                    let satisfaction = match self.rng.gen_range(0..10) {
                        0..=5 => Satisfaction::Satisfied,
                        6..=7 => Satisfaction::BasicallySatisfied,
                        _ => Satisfaction::Unsatisfied,
                    };
                    (
                        reporter,
                        Action::Rate {
                            satisfaction,
                            reopen: false,
                        },
                    )
                }
                _ => break,
            };
            let command = IncidentCommand { actor: who, action };
            let events = match decide(&state, command, Timestamp(now), &self.policy) {
                Ok(events) if !events.is_empty() => events,
                // A move the domain refuses (e.g. nothing due yet): try another roll.
                _ if step < COMMITS_PER_INCIDENT_MAX * 4 => continue,
                _ => break,
            };
            for event in &events {
                state.apply(event);
            }
            let actor_label = match who.role {
                Role::System => "system:synthetic".to_owned(),
                role => format!("{role}/{}", who.id),
            };
            commits.push(PlannedCommit {
                incident,
                command_id: format!("synthetic:{n}:{}", commits.len() + 1),
                occurred_at_ms: now,
                actor: actor_label,
                events,
            });
            if state.is_terminal() && state.rating.is_some() {
                break;
            }
        }
        commits
    }
}

/// Appends planned histories to INCIDENTS: `in_flight` incidents at a time, one commit of
/// each per round, every append at its expected position. Returns the events written.
pub async fn append_histories(
    store: &eventstore::EventStore<codecs::IncidentCodec>,
    histories: &[Vec<PlannedCommit>],
    in_flight: usize,
) -> Result<u64, eventstore::AppendError> {
    let mut events = 0u64;
    for window in histories.chunks(in_flight.max(1)) {
        let aggregates: Vec<eventstore::AggregateId> = window
            .iter()
            .map(|history| {
                let incident = history.first().map_or(uuid::Uuid::nil(), |c| c.incident.0);
                eventstore::AggregateId::new(incident.hyphenated().to_string())
                    .expect("a UUID is a valid aggregate id")
            })
            .collect();
        let mut positions = vec![eventstore::Position::NEW; window.len()];
        let rounds = window.iter().map(Vec::len).max().unwrap_or(0);
        for round in 0..rounds {
            let appends = window
                .iter()
                .enumerate()
                .filter_map(|(at, history)| history.get(round).map(|commit| (at, commit)))
                .map(|(at, planned)| {
                    let commit = eventstore::Commit::new(
                        planned.command_id.clone(),
                        planned.events.clone(),
                        eventstore::CommitMeta {
                            correlation_id: uuid::Uuid::from_u128(planned.incident.0.as_u128()),
                            causation_id: uuid::Uuid::now_v7(),
                            actor: planned.actor.clone(),
                            occurred_at_ms: planned.occurred_at_ms,
                            traceparent: None,
                        },
                    );
                    let aggregate = &aggregates[at];
                    let position = positions[at];
                    async move {
                        store
                            .append(aggregate, &position, &commit)
                            .await
                            .map(|appended| (at, appended.position, commit.events.len()))
                    }
                })
                .collect::<Vec<_>>();
            for result in futures::future::join_all(appends).await {
                let (at, position, count) = result?;
                positions[at] = position;
                events += count as u64;
            }
        }
    }
    Ok(events)
}
