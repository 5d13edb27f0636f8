//! Resident apps: reports published on the durable path (JetStream, `Nats-Msg-Id` = the
//! submission id), receipts followed on `intake.receipts.>`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::Policy;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use intake::wire::{
    Channel, Location, MediaRef, Point, Receipt, SUBJECT_RECEIPTS_PREFIX, SUBJECT_SUBMIT_PREFIX,
    Submission, SubmissionKind,
};
use partition::synthetic::SplitMix64;
use tokio::sync::watch;

use crate::SimulationError;
use crate::city::PlannedCommunity;

/// Publishes awaiting their JetStream acknowledgement at once.
pub const PUBLISH_IN_FLIGHT_MAX: usize = 256;
/// Attempts to publish one submission before giving up (the server may be restarting).
pub const PUBLISH_ATTEMPTS_MAX: u32 = 60;
/// Pause between two publish attempts.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Most incidents whose reporter the simulation remembers (for ratings).
pub const REPORTERS_REMEMBERED_MAX: usize = 1_000_000;

/// What the resident apps do.
#[derive(Debug, Clone, Copy)]
pub struct ResidentPlan {
    pub seed: u64,
    /// Submissions in all.
    pub submissions: u64,
    /// Submissions per second (wall clock).
    pub rate_per_s: f64,
    /// Distinct residents (the intake rate limit is per resident).
    pub residents: u64,
    /// Share of reports that repeat a recent report's category and place (to be merged).
    pub repeat_share: f64,
    /// Share of reports that are invalid (unknown category, outside every community, too long,
    /// too many media references): each must come back rejected with its reason.
    pub invalid_share: f64,
}

impl Default for ResidentPlan {
    fn default() -> Self {
        ResidentPlan {
            seed: 2026,
            submissions: 1_500,
            rate_per_s: 25.0,
            residents: 20_000,
            repeat_share: 0.08,
            invalid_share: 0.03,
        }
    }
}

/// What the residents saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResidentStats {
    pub submitted: u64,
    /// Acknowledged by JetStream: from here on intake must answer, even after a crash.
    pub stored: u64,
    pub filed: u64,
    pub merged: u64,
    pub rejected: BTreeMap<String, u64>,
}

impl ResidentStats {
    pub fn receipts(&self) -> u64 {
        self.filed + self.merged + self.rejected.values().sum::<u64>()
    }
}

/// The resident apps' shared view: statistics and who reported which incident.
#[derive(Debug, Clone, Default)]
pub struct Residents {
    stats: Arc<Mutex<ResidentStats>>,
    reporters: Arc<Mutex<HashMap<uuid::Uuid, uuid::Uuid>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Residents {
    pub fn stats(&self) -> ResidentStats {
        lock(&self.stats).clone()
    }

    /// The resident who first reported `incident`, if a receipt named it.
    pub fn reporter_of(&self, incident: uuid::Uuid) -> Option<uuid::Uuid> {
        lock(&self.reporters).get(&incident).copied()
    }

    /// Follows receipts of durable submissions until `stop`. Start it before `run`.
    pub async fn follow_receipts(
        &self,
        client: &async_nats::Client,
        mut stop: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>, SimulationError> {
        let subject = format!("{SUBJECT_RECEIPTS_PREFIX}>");
        let mut receipts =
            client
                .subscribe(subject.clone())
                .await
                .map_err(|error| SimulationError::Bus {
                    context: format!("subscribe {subject}"),
                    reason: error.to_string(),
                })?;
        client.flush().await.map_err(|error| SimulationError::Bus {
            context: "flush".to_owned(),
            reason: error.to_string(),
        })?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            // Reporter of each submission id, learnt when it is published.
            loop {
                tokio::select! {
                    message = receipts.next() => {
                        let Some(message) = message else { return };
                        let Ok(receipt) = serde_json::from_slice::<Receipt>(&message.payload) else {
                            tracing::warn!(subject = %message.subject, "undecodable receipt");
                            continue;
                        };
                        this.record(&receipt);
                    }
                    _ = stop.changed() => return,
                }
            }
        }))
    }

    fn record(&self, receipt: &Receipt) {
        let mut stats = lock(&self.stats);
        match receipt {
            Receipt::Filed {
                incident_id,
                submission_id,
                ..
            } => {
                stats.filed += 1;
                if let Some(reporter) = reporter_in(submission_id) {
                    let mut reporters = lock(&self.reporters);
                    if reporters.len() < REPORTERS_REMEMBERED_MAX {
                        reporters.insert(*incident_id, reporter);
                    }
                }
            }
            Receipt::Merged { .. } => stats.merged += 1,
            Receipt::Rejected { reason_code, .. } => {
                let code = serde_json::to_value(reason_code)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{reason_code:?}"));
                *stats.rejected.entry(code).or_default() += 1;
            }
            Receipt::Error { .. } => {}
        }
    }

    /// Publishes the plan's submissions at its rate until all are stored or `stop`.
    pub async fn run(
        &self,
        client: &async_nats::Client,
        city: &[PlannedCommunity],
        policy: &Policy,
        plan: ResidentPlan,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), SimulationError> {
        let jetstream = async_nats::jetstream::new(client.clone());
        let submissions = submissions(city, policy, plan);
        let period = Duration::from_secs_f64(1.0 / plan.rate_per_s.max(0.001));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight = FuturesUnordered::new();
        'submissions: for submission in submissions {
            // Until the next tick, drive the publishes in flight (a future only publishes
            // while it is polled) and count the ones stored.
            loop {
                tokio::select! {
                    _ = ticker.tick() => break,
                    Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                        self.stored(result)?;
                    }
                    _ = stop.changed() => break 'submissions,
                }
            }
            while in_flight.len() >= PUBLISH_IN_FLIGHT_MAX {
                if let Some(result) = in_flight.next().await {
                    self.stored(result)?;
                }
            }
            lock(&self.stats).submitted += 1;
            in_flight.push(publish(jetstream.clone(), submission));
        }
        while let Some(result) = in_flight.next().await {
            self.stored(result)?;
        }
        Ok(())
    }

    fn stored(&self, result: Result<(), SimulationError>) -> Result<(), SimulationError> {
        result?;
        lock(&self.stats).stored += 1;
        Ok(())
    }
}

/// Publishes one submission on the durable path, retrying (bounded) until JetStream acks it.
async fn publish(
    jetstream: async_nats::jetstream::Context,
    submission: Submission,
) -> Result<(), SimulationError> {
    let subject = format!("{SUBJECT_SUBMIT_PREFIX}{}", submission.channel.as_str());
    let payload = bytes::Bytes::from(serde_json::to_vec(&submission).map_err(|error| {
        SimulationError::Bus {
            context: "encode a submission".to_owned(),
            reason: error.to_string(),
        }
    })?);
    let mut last_error = String::new();
    for _ in 0..PUBLISH_ATTEMPTS_MAX {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", submission.submission_id.as_str());
        match jetstream
            .publish_with_headers(subject.clone(), headers, payload.clone())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => return Ok(()),
                Err(error) => last_error = error.to_string(),
            },
            Err(error) => last_error = error.to_string(),
        }
        tokio::time::sleep(PUBLISH_RETRY_PAUSE).await;
    }
    Err(SimulationError::NoAnswer {
        subject,
        attempts: PUBLISH_ATTEMPTS_MAX,
        reason: last_error,
    })
}

/// The reporter is encoded in the submission id (`sim-<seed>-<n>-<reporter simple uuid>`), so
/// a receipt names its reporter without a lookup table.
fn reporter_in(submission_id: &str) -> Option<uuid::Uuid> {
    submission_id.rsplit('-').next()?.parse().ok()
}

/// Metres per degree of latitude.
const METRES_PER_DEGREE: f64 = 111_320.0;

/// The plan's submissions, in order; the same plan always gives the same submissions.
pub fn submissions(
    city: &[PlannedCommunity],
    policy: &Policy,
    plan: ResidentPlan,
) -> Vec<Submission> {
    let mut rng = SplitMix64::new(plan.seed ^ 0x005e_ed0f_a995);
    let categories: Vec<&domain::taxonomy::Category> = policy.taxonomy.leaves().collect();
    let mut recent: Vec<(String, Point)> = Vec::new();
    let mut out = Vec::with_capacity(plan.submissions as usize);
    let occurred_at = "2026-11-23T08:00:00Z".to_owned();
    for n in 0..plan.submissions {
        let reporter = uuid::Uuid::from_u64_pair(plan.seed, rng.next_u64() % plan.residents.max(1));
        let submission_id = format!("sim-{}-{n}-{}", plan.seed, reporter.simple());
        let channel = match rng.range(0, 9) {
            0..=6 => Channel::App,
            7..=8 => Channel::Hotline,
            _ => Channel::Patrol,
        };
        let kind = match rng.range(0, 9) {
            0..=5 => SubmissionKind::ProblemReport,
            6..=7 => SubmissionKind::Complaint,
            8 => SubmissionKind::Suggestion,
            _ => SubmissionKind::Consultation,
        };
        let (category, point) = if !recent.is_empty() && rng.unit() < plan.repeat_share {
            let (category, point) = &recent[rng.next_u64() as usize % recent.len()];
            let nudge = 5.0 / METRES_PER_DEGREE;
            (
                category.clone(),
                Point {
                    lon: point.lon + nudge,
                    lat: point.lat - nudge,
                },
            )
        } else {
            let category = categories[rng.next_u64() as usize % categories.len()];
            let community = &city[rng.next_u64() as usize % city.len()];
            let building = &community.input.buildings
                [rng.next_u64() as usize % community.input.buildings.len()];
            let jitter = 15.0 / METRES_PER_DEGREE;
            let point = Point {
                lon: building.position.x() + (rng.unit() - 0.5) * jitter,
                lat: building.position.y() + (rng.unit() - 0.5) * jitter,
            };
            (category.code.to_string(), point)
        };
        if recent.len() < 64 {
            recent.push((category.clone(), point));
        } else {
            let slot = rng.next_u64() as usize % recent.len();
            recent[slot] = (category.clone(), point);
        }
        let name = policy
            .taxonomy
            .get(category.parse().unwrap_or(categories[0].code))
            .map(|c| c.name_zh.clone())
            .unwrap_or_default();
        let mut submission = Submission {
            submission_id,
            kind,
            category,
            location: Location::Point(point),
            description: format!("{name}，请尽快处理（模拟报告 {n}）"),
            media: vec![MediaRef::Sha256(format!("{:064x}", u128::from(n) + 1))],
            channel,
            reporter_id: reporter,
            occurred_at: occurred_at.clone(),
            contact: None,
        };
        if rng.unit() < plan.invalid_share {
            match rng.range(0, 3) {
                0 => submission.category = "9999".to_owned(),
                1 => submission.location = Location::Point(Point { lon: 0.5, lat: 0.5 }),
                2 => submission.description = "长".repeat(4_001),
                _ => {
                    submission.media = (0..10)
                        .map(|m| MediaRef::Sha256(format!("{m:064x}")))
                        .collect();
                }
            }
        }
        out.push(submission);
    }
    out
}
