//! `wangge bench dispatch`: the dispatch service holding many open incidents with pending
//! deadlines — memory per open incident, and decisions per second when they all fall due.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use dispatch::{DispatchConfig, DispatchService, ManualTime, TimeSource};
use domain::incident::{Action, IncidentCommand};
use domain::{Actor, ActorId, IncidentId, Policy, Role, Timestamp, decide};
use eventstore::{
    AggregateId, BoundedContext, Commit, CommitMeta, EventStore, Position, StreamSpec,
};
use futures::StreamExt as _;
use serde::Serialize;

/// 2026-05-06 10:00 (UTC+8), a working day.
const START: Timestamp = Timestamp(1_778_032_800_000);
/// Appends in flight while the bench writes the incidents (as intake would).
const WRITES_IN_FLIGHT: usize = 1_000;
/// Longest wait for the service to escalate every due deadline.
const ESCALATION_WAIT_MAX: Duration = Duration::from_secs(600);
/// Categories the incidents cycle through (working-clock and wall-clock routes).
const CATEGORIES: &[&str] = &["0102", "0106", "0304", "0502", "0405", "0401"];

#[derive(Debug, clap::Args)]
pub struct BenchDispatchArgs {
    /// Open incidents to hold, each with pending deadlines.
    #[arg(long, default_value_t = 100_000)]
    incidents: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DispatchFigures {
    open_incidents: usize,
    pending_deadlines: usize,
    /// (RSS after loading − RSS before) / open incidents.
    bytes_per_open_incident: f64,
    /// Sum of size_of + heap bytes the book owns (map slots by capacity, deadline heap) / open incidents.
    held_bytes_per_open_incident: f64,
    /// Start-up: replay of the INCIDENTS stream into the book.
    load_s: f64,
    /// Due deadlines escalated end to end (decide, append with expected sequence, fold in).
    decisions_per_s: f64,
    decisions: u64,
    /// The pure decider over the held states (no IO), for comparison.
    decide_only_per_s: f64,
    nats_server: String,
}

pub fn run(args: BenchDispatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.incidents >= 1, "--incidents must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    runtime.block_on(bench(args))
}

fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no RSS field")?
        .parse()
        .context("statm RSS")?;
    Ok(pages * 4096)
}

fn system() -> Actor {
    Actor {
        role: Role::System,
        id: ActorId(uuid::Uuid::from_u128(9)),
    }
}

/// The commit intake would write, plus dispatch's own routing: Reported, Filed, Dispatched.
fn incident_commit(
    policy: &Policy,
    n: usize,
) -> anyhow::Result<(AggregateId, Commit<domain::IncidentEvent>)> {
    let incident = IncidentId(uuid::Uuid::from_u128(0x5eed_0000_0000 + n as u128));
    let category = CATEGORIES[n % CATEGORIES.len()];
    let mut state = domain::IncidentState::default();
    let mut events = Vec::new();
    for action in [
        Action::Report {
            incident,
            description: format!("benchmark incident {n}"),
            position: None,
            category_hint: None,
        },
        Action::File {
            grid: format!("350402{:03}{:03}{:03}", 1 + n % 7, 1 + n % 11, 1 + n % 13).parse()?,
            category: category.parse()?,
        },
        Action::Dispatch { to: None },
    ] {
        let reporter = Actor {
            role: Role::Resident,
            id: ActorId(uuid::Uuid::from_u128(n as u128)),
        };
        let actor = if matches!(action, Action::Report { .. }) {
            reporter
        } else {
            system()
        };
        let produced = decide(&state, IncidentCommand { actor, action }, START, policy)
            .map_err(|rejection| anyhow::anyhow!("incident {n}: {rejection}"))?;
        for event in produced {
            state.apply(&event);
            events.push(event);
        }
    }
    let meta = CommitMeta {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: "system:bench".to_owned(),
        occurred_at_ms: START.0,
        traceparent: None,
    };
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string())?;
    Ok((aggregate, Commit::new(format!("bench:{n}"), events, meta)))
}

async fn bench(args: BenchDispatchArgs) -> anyhow::Result<()> {
    let server = testkit::NatsServer::start().context("start a private nats-server")?;
    let binary = testkit::nats_server_binary().context("find nats-server")?;
    let nats_server = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let policy = Policy::embedded("sanming").context("sanming policy")?;
    let spec = StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120));

    // 1. Write the incidents (as intake and a first dispatch would have).
    {
        let client = async_nats::connect(server.url()).await.context("connect")?;
        let store = EventStore::open(
            async_nats::jetstream::new(client.clone()),
            spec.clone(),
            dispatch::IncidentCodec,
        )
        .await
        .context("open INCIDENTS")?;
        let started = Instant::now();
        let store_ref = &store;
        let policy_ref = &policy;
        let mut writes = futures::stream::iter(0..args.incidents)
            .map(|n| async move {
                let (aggregate, commit) = incident_commit(policy_ref, n)?;
                store_ref
                    .append(&aggregate, &Position::NEW, &commit)
                    .await
                    .with_context(|| format!("append incident {n}"))?;
                anyhow::Ok(())
            })
            .buffer_unordered(WRITES_IN_FLIGHT);
        while let Some(result) = writes.next().await {
            result?;
        }
        eprintln!(
            "wrote {} incidents in {:.1}s",
            args.incidents,
            started.elapsed().as_secs_f64()
        );
    }

    // 2. Start dispatch: RSS before and after it loads the book.
    let client = async_nats::connect(server.url()).await.context("connect")?;
    let store = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        spec,
        dispatch::IncidentCodec,
    )
    .await
    .context("open INCIDENTS")?;
    let time = ManualTime::new(START);
    let mut config = DispatchConfig::new(policy.clone());
    config.time = TimeSource::Manual(time.clone());
    config.deadline_poll_max = Duration::from_millis(10);
    config.snapshot_bucket = None;
    config.notify = false;
    config.serve_requests = false;
    let rss_before = rss_bytes()?;
    let started = Instant::now();
    let service = DispatchService::start(client, store, config)
        .await
        .context("start dispatch")?;
    let load_s = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes()?;
    let stats = service.book_stats();
    anyhow::ensure!(
        stats.open_incidents == args.incidents,
        "held {} open incidents, expected {}",
        stats.open_incidents,
        args.incidents
    );
    let open = stats.open_incidents as f64;

    // 3. The pure decider over the held states, at a time when every response is overdue.
    let due_at = Timestamp(START.0 + 30 * 24 * 60 * 60_000);
    let started = Instant::now();
    let mut decided = 0u64;
    for n in 0..args.incidents {
        let incident = IncidentId(uuid::Uuid::from_u128(0x5eed_0000_0000 + n as u128));
        if let Some(held) = service.book().get(incident) {
            let command = IncidentCommand {
                actor: system(),
                action: Action::DeadlineElapsed,
            };
            if decide(&held.state, command, due_at, &policy).is_ok() {
                decided += 1;
            }
        }
    }
    let decide_only_per_s = decided as f64 / started.elapsed().as_secs_f64();

    // 4. Every deadline falls due at once: the service escalates them all.
    let mut progress = service.progress();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(service.run(stopped));
    let started = Instant::now();
    time.set(due_at);
    let target = args.incidents as u64;
    let wait = async {
        while progress.borrow().deadlines_escalated < target {
            if progress.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::time::timeout(ESCALATION_WAIT_MAX, wait)
        .await
        .context("escalations did not finish")?;
    let elapsed = started.elapsed().as_secs_f64();
    let decisions = progress.borrow().deadlines_escalated;
    let _ = stop.send(true);
    task.await.context("join dispatch")?.context("dispatch")?;

    let figures = DispatchFigures {
        open_incidents: stats.open_incidents,
        pending_deadlines: stats.pending_deadlines,
        bytes_per_open_incident: rss_after.saturating_sub(rss_before) as f64 / open,
        held_bytes_per_open_incident: stats.held_bytes as f64 / open,
        load_s,
        decisions_per_s: decisions as f64 / elapsed,
        decisions,
        decide_only_per_s,
        nats_server,
    };
    eprintln!(
        "open incidents {}: {:.0} B/incident by RSS, {:.0} B by accounting; load {:.2}s; {:.0} escalations/s end to end; {:.0} decides/s in memory",
        figures.open_incidents,
        figures.bytes_per_open_incident,
        figures.held_bytes_per_open_incident,
        figures.load_s,
        figures.decisions_per_s,
        figures.decide_only_per_s
    );
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    }
    drop(server);
    Ok(())
}
