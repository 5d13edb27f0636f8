//! `wangge demo`: the whole system on one machine, a simulated city on it, and a report.
//!
//! WHY child processes: the demo runs the same `wangge serve <service>` processes a city runs
//! (same binary, same configuration path, same NATS contracts), not an in-process shortcut,
//! so what it shows is what a deployment does. Its figures are read back from the read models
//! (projection) and the streams; the simulation only decides what residents and consoles do.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventstore::{BoundedContext, EventStore, StreamSpec};
use serde_json::{Value, json};
use simulation::{Behaviour, CityPlan, ConsolePlan, Consoles, ResidentPlan, Residents};
use tokio::sync::watch;

use super::children::Services;
use crate::config::Settings;

/// Longest wait for the read models to reflect the end of the streams.
const READ_MODELS_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for receipts of stored submissions after the last one was published.
const RECEIPTS_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

const DEMO_HELP: &str = "\
What it does, in order:
  1. starts a private nats-server (JetStream, temporary store, free loopback port);
  2. starts `wangge serve registry|intake|dispatch|projection` as child processes (logs in
     <out>/logs/); intake and dispatch run on compressed time (--time-scale, default 600:
     one wall minute is ten hours of deadlines);
  3. plans a seeded city (4 streets x 6 communities, ~55,000 households), registers it with
     the registry, which partitions every community into ~200-household grids, and assigns a
     grid worker to every grid;
  4. runs resident apps (reports on the durable path, some repeated, some invalid) and the
     consoles of every department of the city's routing table, grid workers, communities and
     streets (a seeded share of departments slow or silent, so whistles blow);
  5. prints live progress, then the report, read back from the read models and the streams,
     and writes <out>/report.json, <out>/grids.geojson and <out>/map.svg.
Exits 0 when every check in the report passed. The nats-server binary is
$WANGGE_NATS_SERVER if set, else the pinned copy in tools/nats (`scripts/nats-server.sh`
installs it), else `nats-server` on PATH. Example:

    wangge demo --seed 7 --reports 3000 --rate 50 --out /tmp/wangge-demo";

/// Start a private nats-server and every service, simulate a city, print a report.
#[derive(Debug, clap::Args)]
#[command(after_long_help = DEMO_HELP)]
pub struct DemoArgs {
    /// Seed of the city, the reports and the consoles' behaviour.
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// Folder for report.json, grids.geojson, map.svg and the services' logs.
    #[arg(long, default_value = "demo-output")]
    pub out: PathBuf,
    /// Reports the residents submit in all.
    #[arg(long, default_value_t = 1_500)]
    pub reports: u64,
    /// Reports per second.
    #[arg(long, default_value_t = 25.0)]
    pub rate: f64,
    /// Dispatch's time compression (virtual seconds per wall second).
    #[arg(long, default_value_t = 600)]
    pub time_scale: u32,
    /// Share of departments that answer late.
    #[arg(long, default_value_t = 0.25)]
    pub slow_share: f64,
    /// Share of departments that never answer.
    #[arg(long, default_value_t = 0.15)]
    pub silent_share: f64,
    /// Wall seconds to let deadlines run after the last report, before the report is taken.
    #[arg(long, default_value_t = 20)]
    pub settle_seconds: u64,
}

pub fn run(settings: &Settings, args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.time_scale >= 1, "--time-scale must be at least 1");
    let started = Instant::now();
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let server = testkit::NatsServer::start().context("start a private nats-server")?;
    let url = server.url();
    say(&format!(
        "nats-server {} on {url} (store {})",
        server.name(),
        server.store_dir().display()
    ));
    let origin_ms = dispatch::clock::wall_ms();
    let mut services = Services::default();
    services.share_policy(settings);
    let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    services.spawn(
        "registry",
        &owned(&["serve", "registry"]),
        &url,
        Some(&logs),
    )?;
    // Intake sets the deadlines of the incidents it files and routes, so it decides on the
    // same compressed clock as dispatch, which escalates them.
    let compressed_time = [
        "--time-scale".to_owned(),
        args.time_scale.to_string(),
        "--time-origin-ms".to_owned(),
        origin_ms.to_string(),
    ];
    let mut intake_args = owned(&["serve", "intake"]);
    intake_args.extend(compressed_time.iter().cloned());
    services.spawn("intake", &intake_args, &url, Some(&logs))?;
    let mut dispatch_args = owned(&["serve", "dispatch"]);
    dispatch_args.extend(compressed_time);
    services.spawn("dispatch", &dispatch_args, &url, Some(&logs))?;
    services.spawn(
        "projection",
        &owned(&["serve", "projection"]),
        &url,
        Some(&logs),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut settings = settings.clone();
    settings.nats.url = url.clone();
    let outcome = runtime.block_on(super::children::until_signalled(simulate(
        &settings,
        &args,
        &mut services,
        started,
    )));
    // The demo's own connection ends before the server does (no "connection lost" warnings
    // after the report).
    drop(runtime);
    services.stop();
    drop(server);
    let report = outcome?;
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .map(|checks| checks.iter().filter(|c| c["passed"] != true).collect())
        .unwrap_or_default();
    say(&format!(
        "done in {:.0} s; outputs in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    ));
    anyhow::ensure!(failed.is_empty(), "{} check(s) failed", failed.len());
    Ok(())
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "[demo] {line}");
}

async fn simulate(
    settings: &Settings,
    args: &DemoArgs,
    services: &mut Services,
    started: Instant,
) -> anyhow::Result<Value> {
    let client = super::serve::connect(settings, "demo").await?;
    let jetstream = async_nats::jetstream::new(client.clone());
    services
        .wait_ready(&client, |name, subject| {
            say(&format!("{name} is answering on {subject}"));
        })
        .await?;

    let policy = settings.policy()?;
    let city = simulation::plan_city(CityPlan {
        seed: args.seed,
        ..CityPlan::default()
    });
    let households: u64 = city.iter().map(|c| c.households()).sum();
    let buildings: usize = city.iter().map(|c| c.input.buildings.len()).sum();
    say(&format!(
        "city: {} communities in {} streets, {buildings} buildings, {households} households; registering",
        city.len(),
        city.iter()
            .map(|c| &c.street_code)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    ));
    let registering = Instant::now();
    let grids = simulation::register_city(&client, &city, |done, total| {
        if done % 6 == 0 || done == total {
            say(&format!("  registered {done}/{total} communities"));
        }
    })
    .await
    .context("register the city")?;
    say(&format!(
        "registry drew {} grids and assigned as many grid workers in {:.1} s",
        grids.len(),
        registering.elapsed().as_secs_f64()
    ));

    let (stop, stopped) = watch::channel(false);
    let residents = Residents::default();
    let receipts_task = residents.follow_receipts(&client, stopped.clone()).await?;
    let console_plan = ConsolePlan::seeded(args.seed, &policy, args.slow_share, args.silent_share);
    let behaviours = console_plan.departments.clone();
    let (consoles, consoles_task) =
        Consoles::start(&client, console_plan, residents.clone(), stopped.clone()).await?;
    let resident_plan = ResidentPlan {
        seed: args.seed,
        submissions: args.reports,
        rate_per_s: args.rate,
        ..ResidentPlan::default()
    };
    say(&format!(
        "{} reports at {}/s; departments: {} prompt, {} slow, {} silent",
        args.reports,
        args.rate,
        behaviours
            .values()
            .filter(|b| **b == Behaviour::Prompt)
            .count(),
        behaviours
            .values()
            .filter(|b| **b == Behaviour::Slow)
            .count(),
        behaviours
            .values()
            .filter(|b| **b == Behaviour::Silent)
            .count(),
    ));
    let reporting = {
        let residents = residents.clone();
        let client = client.clone();
        let stopped = stopped.clone();
        let city = city.clone();
        let policy = policy.clone();
        tokio::spawn(async move {
            residents
                .run(&client, &city, &policy, resident_plan, stopped)
                .await
        })
    };
    // Live progress until the reports are in, then let deadlines run.
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.tick().await;
    let mut reporting = Some(reporting);
    let mut settle_until: Option<Instant> = None;
    loop {
        ticker.tick().await;
        services.check_alive()?;
        progress(&jetstream, &residents, &consoles, started).await;
        if let Some(task) = &reporting
            && task.is_finished()
        {
            let task = reporting.take().expect("checked above");
            task.await
                .context("resident apps task")?
                .context("resident apps")?;
            settle_until = Some(Instant::now() + Duration::from_secs(args.settle_seconds));
            say(&format!(
                "all reports stored; letting deadlines run for {} s",
                args.settle_seconds
            ));
        }
        if settle_until.is_some_and(|until| Instant::now() >= until) {
            break;
        }
    }
    // Every stored submission must have its receipt.
    let deadline = Instant::now() + RECEIPTS_TIMEOUT;
    while residents.stats().receipts() < residents.stats().stored && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(true);
    let _ = receipts_task.await;
    // How the consoles ended is a check of the report: a console loop that stopped on an
    // error leaves dispatch's notices unanswered while intake's checks still pass.
    let consoles_outcome = match consoles_task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(format!("the consoles' task ended abnormally: {error}")),
    };

    let report = build_report(
        settings,
        args,
        &jetstream,
        &residents,
        &consoles,
        &behaviours,
        households,
        buildings,
        consoles_outcome,
    )
    .await?;
    // A service that died while the report was read back (after the last progress tick)
    // fails the run too.
    services.check_alive()?;
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )
    .context("write report.json")?;
    print_report(&report)?;
    Ok(report)
}

async fn progress(
    jetstream: &async_nats::jetstream::Context,
    residents: &Residents,
    consoles: &Consoles,
    started: Instant,
) {
    let stats = residents.stats();
    let console_stats = consoles.stats();
    let models = match projection::ReadModels::current(jetstream).await {
        Ok(Some(models)) => models.totals().await.ok(),
        _ => None,
    };
    let (incidents, open, closed, whistles) = match &models {
        Some(totals) => (
            totals.incidents,
            totals.open,
            totals.by_status.get("closed").copied().unwrap_or(0),
            totals
                .whistles
                .iter()
                .map(|w| w.blown + w.escalated)
                .sum::<u64>(),
        ),
        None => (0, 0, 0, 0),
    };
    say(&format!(
        "{:>4.0} s  reports {} stored {} | receipts filed {} merged {} rejected {} | read models: incidents {incidents} open {open} closed {closed} whistles {whistles} | console commands {}",
        started.elapsed().as_secs_f64(),
        stats.submitted,
        stats.stored,
        stats.filed,
        stats.merged,
        stats.rejected.values().sum::<u64>(),
        console_stats.accepted.values().sum::<u64>(),
    ));
}

fn check(name: &str, passed: bool, detail: String) -> Value {
    json!({"name": name, "passed": passed, "detail": detail})
}

#[allow(clippy::too_many_arguments)]
async fn build_report(
    settings: &Settings,
    args: &DemoArgs,
    jetstream: &async_nats::jetstream::Context,
    residents: &Residents,
    consoles: &Consoles,
    behaviours: &BTreeMap<String, Behaviour>,
    households: u64,
    buildings: usize,
    consoles_outcome: Result<(), String>,
) -> anyhow::Result<Value> {
    let spec = |context| {
        StreamSpec::for_context(
            context,
            settings.store.replicas,
            Duration::from_secs(settings.store.duplicate_window_seconds),
        )
    };
    let incidents_store = EventStore::open_existing(
        jetstream.clone(),
        spec(BoundedContext::Incidents),
        codecs::IncidentCodec,
    )
    .await?;
    let grids_store = EventStore::open_existing(
        jetstream.clone(),
        spec(BoundedContext::Grids),
        registry::RegistryCodec,
    )
    .await?;
    let intake_store = EventStore::open_existing(
        jetstream.clone(),
        spec(BoundedContext::Intake),
        intake::IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
    )
    .await?;
    let incidents_last = incidents_store.last_sequence().await?;
    let grids_last = grids_store.last_sequence().await?;
    let models = projection::ReadModels::current(jetstream)
        .await?
        .context("the projection never wrote a read model")?;
    let checkpoint = models
        .wait_for(incidents_last, grids_last, READ_MODELS_CATCH_UP_TIMEOUT)
        .await?;
    let totals = models.totals().await?;
    let department_scorecards = models.department_scorecards().await?;
    let street_scorecards = models.street_scorecards().await?;
    let compliance = models.compliance_all().await?;

    // Grids, from the registry's own stream (the source of truth for the map).
    let map = super::demo_map::GridMap::read(&grids_store).await?;
    map.write(&args.out)?;
    let grid_summary = map.summary();

    let mut verification = Vec::new();
    let mut intact = true;
    for report in [
        grids_store.verify(|_, _| {}).await?,
        incidents_store.verify(|_, _| {}).await?,
        intake_store.verify(|_, _| {}).await?,
    ] {
        intact &= report.is_intact();
        verification.push(json!({
            "stream": report.stream, "commits": report.commits_checked,
            "aggregates": report.aggregates, "findings": report.findings_total,
        }));
    }
    let stats = residents.stats();
    let console_stats = consoles.stats();
    let registered_households = grid_summary["households"].as_u64().unwrap_or(0);
    let registered_buildings = grid_summary["buildings"].as_u64().unwrap_or(0);
    let closed = totals.by_status.get("closed").copied().unwrap_or(0);
    let whistles_blown: u64 = totals.whistles.iter().map(|w| w.blown).sum();
    let any_silent = behaviours.values().any(|b| *b == Behaviour::Silent);
    let checks = vec![
        check(
            "every stored report has a receipt",
            stats.receipts() >= stats.stored,
            format!("{} stored, {} receipts", stats.stored, stats.receipts()),
        ),
        check(
            "read models count every filed incident once",
            totals.incidents == stats.filed,
            format!(
                "read models: {} incidents; receipts: {} filed",
                totals.incidents, stats.filed
            ),
        ),
        check(
            "read models reflect the whole log",
            checkpoint.incidents_sequence >= incidents_last
                && checkpoint.grids_sequence >= grids_last,
            format!(
                "checkpoint INCIDENTS {} / {incidents_last}, GRIDS {} / {grids_last}",
                checkpoint.incidents_sequence, checkpoint.grids_sequence
            ),
        ),
        check(
            "hash chains intact",
            intact,
            format!("{} streams verified", verification.len()),
        ),
        check(
            "at least 20 communities and 50,000 households, as the registry stored them",
            grid_summary["communities"].as_u64().unwrap_or(0) >= 20
                && registered_households >= 50_000
                && registered_households == households
                && registered_buildings == buildings as u64,
            format!(
                "registry: {} communities, {registered_households} households in grids, \
                 {registered_buildings} buildings; planned {households} households, \
                 {buildings} buildings",
                grid_summary["communities"]
            ),
        ),
        check(
            "consoles answered every notice they acted on",
            console_stats.failed == 0 && consoles_outcome.is_ok(),
            format!(
                "{} commands accepted, {} refused, {} failed{}",
                console_stats.accepted.values().sum::<u64>(),
                console_stats.rejected.values().sum::<u64>(),
                console_stats.failed,
                consoles_outcome
                    .as_ref()
                    .err()
                    .map_or(String::new(), |error| format!("; {error}"))
            ),
        ),
        check(
            "cases closed and whistles blew",
            closed > 0 && (whistles_blown > 0 || !any_silent),
            format!(
                "{closed} closed; {whistles_blown} whistles blown ({} silent department(s))",
                behaviours
                    .values()
                    .filter(|b| **b == Behaviour::Silent)
                    .count()
            ),
        ),
    ];
    Ok(json!({
        "seed": args.seed,
        "city": settings.city,
        "time_scale": args.time_scale,
        "city_plan": {"buildings": buildings, "households": households},
        "grids": grid_summary,
        "residents": stats,
        "consoles": {"behaviours": behaviours, "stats": console_stats},
        "incidents": {"total": totals.incidents, "open": totals.open, "by_status": totals.by_status},
        "whistles": totals.whistles,
        "deadlines": totals.deadlines,
        "department_scorecards": department_scorecards,
        "street_scorecards": street_scorecards,
        "community_compliance": compliance,
        "read_models": {"generation": models.generation(), "checkpoint": checkpoint},
        "streams": verification,
        "checks": checks,
    }))
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{:.0}%", v * 100.0))
}

fn print_report(report: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let grids = &report["grids"];
    writeln!(out, "\n== wangge demo report (seed {}) ==", report["seed"])?;
    writeln!(
        out,
        "Grids: {} in {} communities; households per grid min {} / p10 {} / median {} / p90 {} / max {}; {} within 150-250, {} flagged {}",
        grids["grids"],
        grids["communities"],
        grids["households_min"],
        grids["households_p10"],
        grids["households_median"],
        grids["households_p90"],
        grids["households_max"],
        grids["in_range"],
        grids["flagged"],
        grids["flags"]
    )?;
    let residents = &report["residents"];
    writeln!(
        out,
        "Reports: {} submitted, {} stored; receipts: {} filed, {} merged into open incidents, rejected {}",
        residents["submitted"],
        residents["stored"],
        residents["filed"],
        residents["merged"],
        residents["rejected"]
    )?;
    writeln!(
        out,
        "Incidents (read models): {} in all, {} open; by state {}",
        report["incidents"]["total"], report["incidents"]["open"], report["incidents"]["by_status"]
    )?;
    writeln!(out, "Whistles by kind and level:")?;
    for whistle in report["whistles"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<10} {:<10} blown {:>4}  escalated to {:>4}",
            whistle["kind"].as_str().unwrap_or(""),
            whistle["level"].as_str().unwrap_or(""),
            whistle["blown"],
            whistle["escalated"]
        )?;
    }
    let deadlines = &report["deadlines"];
    writeln!(
        out,
        "Deadlines (on time / late / missed): response {} / {} / {}; resolution {} / {} / {}; whistle reports {} / {} / {}",
        deadlines["response_on_time"],
        deadlines["response_late"],
        deadlines["response_missed"],
        deadlines["resolution_on_time"],
        deadlines["resolution_late"],
        deadlines["resolution_missed"],
        deadlines["reports_on_time"],
        deadlines["reports_late"],
        deadlines["reports_missed"]
    )?;
    writeln!(
        out,
        "Department scorecards (响应率 response / 解决率 resolution / 满意率 satisfaction / score):"
    )?;
    let behaviours = &report["consoles"]["behaviours"];
    let mut cards: Vec<&serde_json::Value> = report["department_scorecards"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    cards.sort_by_key(|card| card["id"].as_str().unwrap_or(""));
    for card in &cards {
        let id = card["id"].as_str().unwrap_or("");
        writeln!(
            out,
            "  {:<14} {:<7} assigned {:>4}  {:>5} {:>5} {:>5}  {}",
            id,
            behaviours[id].as_str().unwrap_or("prompt"),
            card["tally"]["assignments"],
            percent(card["response_rate"].as_f64()),
            percent(card["resolution_rate"].as_f64()),
            percent(card["satisfaction_rate"].as_f64()),
            card["score"]
                .as_f64()
                .map_or("—".to_owned(), |s| format!("{s:.2}")),
        )?;
    }
    // A department no event has named yet has no scorecard in the read models.
    let mut idle: Vec<&str> = behaviours
        .as_object()
        .into_iter()
        .flat_map(|departments| departments.iter())
        .map(|(id, _)| id.as_str())
        .filter(|id| !cards.iter().any(|card| card["id"] == *id))
        .collect();
    idle.sort_unstable();
    if !idle.is_empty() {
        writeln!(out, "  no case routed to: {}", idle.join(", "))?;
    }
    writeln!(out, "Checks:")?;
    for check in report["checks"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  [{}] {} ({})",
            if check["passed"] == true {
                "ok"
            } else {
                "FAILED"
            },
            check["name"].as_str().unwrap_or(""),
            check["detail"].as_str().unwrap_or("")
        )?;
    }
    Ok(())
}
