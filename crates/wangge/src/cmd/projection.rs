//! `wangge serve projection` and `wangge projection rebuild | as-of | status`.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use eventstore::{BoundedContext, StreamSpec};
use projection::{ProjectionConfig, ProjectionService, RebuildOptions, ScoreWeights, Until};

use super::instant::{format_ms, parse_instant};
use super::serve::{runtime, service_runtime, stop_on_signal, wait_stopped};
use crate::config::Settings;

const SERVE_HELP: &str = "\
Folds the INCIDENTS and GRIDS streams into read models in NATS KV (bucket PROJ_G<n>, the
current generation named by key `current` of bucket PROJECTION) and answers queries (queue
group `projection`):

  projection.query.incident     {\"incident_id\"}            -> the incident's view
  projection.query.board        {\"department\"}             -> open cases by urgency
  projection.query.area         {\"level\":\"grid|community|street\",\"code\"?}
  projection.query.scorecards   {\"kind\":\"department|street\",\"id\"?}
  projection.query.totals       {}  -> incidents by status, whistles, deadline compliance
  projection.query.compliance   {\"community_id\"?}          -> standards compliance
  projection.query.checkpoint   {}

A list (area, scorecards, compliance without an id) comes in pages: \"after\"?, \"limit\"? (1..=5000);
an answer with \"next_after\" has more. Replies: {\"status\":\"found\",\"generation\",\"checkpoint\",
\"value\",\"next_after\"?} | {\"status\":\"not_found\",..} | {\"status\":\"rejected\",\"reason_code\",
\"message\"} (fix the query) | {\"status\":\"error\",\"reason_code\":\"store_unavailable\",..} (ask
again). Run as many instances as you like, each with its own
--instance: they compete for the builder lease (key `builder` of bucket PROJECTION); the holder
folds, the others stand by and answer queries, and one takes over within TTL + TTL/10 (11 s by
default) when the builder dies, resuming from the KV checkpoint. `wangge projection status` names
the holder. On SIGINT/SIGTERM it flushes, acknowledges, gives the lease back and exits 0.
Scorecard weights: no seed policy document gives figures, so they default to equal weights;
set them once in [projection] (weight_response, weight_resolution, weight_satisfaction), which
`projection rebuild` and `projection as-of` read too, so their scorecards match the service's.
See docs/PROJECTION.md.";

/// Longest `--builder-lease-ttl-seconds` (an hour without a builder after a crash is already
/// more than a city would accept).
const BUILDER_LEASE_TTL_MAX_SECONDS: u64 = 3_600;

/// Runs the projection builder until SIGINT/SIGTERM.
#[derive(Debug, clap::Args)]
#[command(after_long_help = SERVE_HELP)]
pub struct ServeArgs {
    /// Name of this instance (in its private GRIDS consumer's name and in logs).
    #[arg(long, default_value = "projection", value_parser = super::serve::subject_token)]
    pub instance: String,
    /// NATS queue group shared by all projection instances for queries.
    #[arg(long, default_value = projection::wire::QUEUE_GROUP, value_parser = super::serve::subject_token)]
    pub queue_group: String,
    /// Answer queries only; never compete for the builder lease.
    #[arg(long)]
    pub queries_only: bool,
    /// Builder lease TTL: a standby takes over this long after the builder's last renewal
    /// (the builder renews every TTL/5 and stops folding after 7/10 of it without one).
    /// 1 to 3,600.
    #[arg(
        long,
        default_value_t = projection::BUILDER_LEASE_TTL.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=BUILDER_LEASE_TTL_MAX_SECONDS)
    )]
    pub builder_lease_ttl_seconds: u64,
    #[command(flatten)]
    pub weights: WeightArgs,
}

/// Weights of the three rates in the scorecards' score; each overrides its setting in
/// `[projection]` (default 1, equal weights).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct WeightArgs {
    /// Weight of the response rate (响应率), 0 to 1000. [default: setting
    /// `projection.weight_response`, 1]
    #[arg(long)]
    pub weight_response: Option<f64>,
    /// Weight of the resolution rate (解决率), 0 to 1000. [default: setting
    /// `projection.weight_resolution`, 1]
    #[arg(long)]
    pub weight_resolution: Option<f64>,
    /// Weight of the satisfaction rate (满意率), 0 to 1000. [default: setting
    /// `projection.weight_satisfaction`, 1]
    #[arg(long)]
    pub weight_satisfaction: Option<f64>,
}

impl WeightArgs {
    /// The settings' weights with the flags given in their place, checked.
    fn weights(self, settings: &Settings) -> anyhow::Result<ScoreWeights> {
        let mut merged = settings.projection.clone();
        if let Some(weight) = self.weight_response {
            merged.weight_response = weight;
        }
        if let Some(weight) = self.weight_resolution {
            merged.weight_resolution = weight;
        }
        if let Some(weight) = self.weight_satisfaction {
            merged.weight_satisfaction = weight;
        }
        merged.validate()?;
        Ok(ScoreWeights {
            response: merged.weight_response,
            resolution: merged.weight_resolution,
            satisfaction: merged.weight_satisfaction,
        })
    }
}

/// Read-model maintenance: rebuild, replay as of a time or sequence.
#[derive(Debug, clap::Subcommand)]
pub enum ProjectionCommand {
    /// Rebuild every read model from stream sequence 0 into a fresh generation, then swap.
    ///
    /// A running builder follows the swap. The generation replaced is kept (readers may be
    /// mid-read); older ones are deleted. One rebuild at a time: it claims its generation
    /// first (key `rebuild` of bucket PROJECTION), and a second one started meanwhile is
    /// refused before it touches any bucket; a claim not renewed for 10 minutes (a rebuild
    /// that died) is taken over.
    Rebuild(RebuildArgs),
    /// Replay the streams up to a time or an INCIDENTS sequence into a separate bucket
    /// (PROJ_ASOF_<label>) for audits; the current generation is untouched.
    AsOf(AsOfArgs),
    /// Delete as-of replay buckets (PROJ_ASOF_*) once the audit is done; `status` lists them.
    DropAsOf(DropAsOfArgs),
    /// Print the current generation, its checkpoint, the builder lease and the as-of buckets.
    Status,
}

#[derive(Debug, clap::Args)]
pub struct DropAsOfArgs {
    /// Labels (S120, T1767225600000) or bucket names (PROJ_ASOF_S120).
    #[arg(required_unless_present = "all")]
    pub names: Vec<String>,
    /// Every as-of bucket on the server.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
}

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub weights: WeightArgs,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("point").required(true).args(["time", "sequence"])))]
pub struct AsOfArgs {
    /// Everything stored at or before this time: RFC 3339 with its UTC offset, e.g.
    /// 2026-05-06T18:00:00+08:00 or 2026-05-06T10:00:00Z (a time without an offset is refused).
    #[arg(long, value_name = "TIME", value_parser = parse_instant)]
    pub time: Option<i64>,
    /// INCIDENTS up to this stream sequence (GRIDS up to the time it was stored).
    #[arg(long)]
    pub sequence: Option<u64>,
    /// Print the report and the totals as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub weights: WeightArgs,
}

fn spec(settings: &Settings, context: BoundedContext) -> StreamSpec {
    StreamSpec::for_context(
        context,
        settings.store.replicas,
        Duration::from_secs(settings.store.duplicate_window_seconds),
    )
}

fn profile(settings: &Settings) -> Option<standards::Profile> {
    match standards::builtin(&settings.city) {
        Ok(profile) => Some(profile),
        Err(error) => {
            tracing::warn!(city = %settings.city, %error, "no standards profile: compliance is not evaluated");
            None
        }
    }
}

fn rebuild_options(settings: &Settings, weights: ScoreWeights) -> RebuildOptions {
    let mut options = RebuildOptions::new(
        spec(settings, BoundedContext::Incidents),
        spec(settings, BoundedContext::Grids),
    );
    options.replicas = settings.store.replicas;
    options.weights = weights;
    options.profile = profile(settings);
    options
}

pub fn serve(settings: &Settings, args: ServeArgs) -> anyhow::Result<()> {
    let weights = args.weights.weights(settings)?;
    service_runtime(settings)?.block_on(async {
        // Listen before the (possibly long) load so a signal during it is not lost.
        let (signals, stopped) = stop_on_signal();
        let client = super::serve::connect(settings, &args.instance).await?;
        // Health, metrics (when `observe.metrics_address` is set) and the lag of both streams
        // behind what the builder has folded.
        let observer = super::serve::observe_service(
            settings,
            "projection",
            &args.instance,
            &client,
            &["INCIDENTS", "GRIDS"],
            &stopped,
        )
        .await?;
        let mut config = ProjectionConfig::new(
            spec(settings, BoundedContext::Incidents),
            spec(settings, BoundedContext::Grids),
        );
        config.instance = args.instance;
        config.queue_group = args.queue_group;
        config.replicas = settings.store.replicas;
        config.weights = weights;
        config.profile = profile(settings);
        config.departments = settings.policy()?
            .routing
            .departments()
            .map(|department| department.id.to_string())
            .collect();
        config.build = !args.queries_only;
        config.lease =
            projection::LeaseTiming::from_ttl(Duration::from_secs(args.builder_lease_ttl_seconds));
        let service = tokio::select! {
            started = ProjectionService::start(client, config) => started.context("start the projection")?,
            _ = wait_stopped(stopped.clone()) => {
                tracing::info!("stopped during start");
                return Ok(());
            }
        };
        observer.set_started();
        let mut progress = service.progress();
        let reporter = tokio::spawn(async move {
            // Only the builder folds: `wangge_commits_folded_total` grows on it alone.
            let mut folded = 0;
            while progress.changed().await.is_ok() {
                let reached = *progress.borrow();
                observer.metrics().reached("INCIDENTS", reached.incidents_sequence);
                observer.metrics().reached("GRIDS", reached.grids_sequence);
                let now_folded = reached.applied + reached.skipped;
                observer
                    .metrics()
                    .commits_folded
                    .inc_by(now_folded.saturating_sub(folded));
                folded = now_folded;
            }
        });
        let result = service.run(stopped).await.context("projection");
        reporter.abort();
        signals.abort();
        result
    })
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
struct Bar(indicatif::ProgressBar);

impl projection::ProgressSink for Bar {
    fn target(&self, incidents_target: u64) {
        self.0.set_length(incidents_target);
    }

    fn reached(&self, incidents_sequence: u64) {
        self.0.set_position(incidents_sequence);
    }
}

fn bar(message: &'static str) -> Bar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} INCIDENTS sequences ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message);
    Bar(bar)
}

pub fn run(settings: &Settings, command: ProjectionCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let client = super::serve::connect(settings, "projection-cli").await?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let mut out = std::io::stdout().lock();
        match command {
            ProjectionCommand::Rebuild(args) => {
                let options = rebuild_options(settings, args.weights.weights(settings)?);
                let progress = bar("rebuild");
                let report = projection::rebuild(&jetstream, &options, &progress)
                    .await
                    .context("rebuild the read models")?;
                progress.0.finish_and_clear();
                warn_not_following(&report);
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&report)?)?;
                } else {
                    writeln!(
                        out,
                        "generation {} is current (was {}): {} commits, {} events, {} incidents \
                         up to INCIDENTS sequence {} and GRIDS sequence {}; {} keys written in {:.1} s",
                        report.generation,
                        report
                            .previous_generation
                            .map_or("none".to_owned(), |g| g.to_string()),
                        report.commits,
                        report.events,
                        report.incidents,
                        report.incidents_sequence,
                        report.grids_sequence,
                        report.keys_written,
                        report.elapsed_ms as f64 / 1000.0
                    )?;
                }
            }
            ProjectionCommand::AsOf(args) => {
                let until = match (args.time, args.sequence) {
                    (Some(ms), _) => {
                        // The option carries its offset; say in UTC what it came to.
                        eprintln!(
                            "as of {} (UTC): commits stored at or before it",
                            format_ms(ms)
                        );
                        Until::Time(ms)
                    }
                    (None, Some(sequence)) => Until::Sequence(sequence),
                    (None, None) => anyhow::bail!("give --time or --sequence"),
                };
                let options = rebuild_options(settings, args.weights.weights(settings)?);
                let progress = bar("as-of");
                let report = projection::as_of(&jetstream, &options, until, &progress)
                    .await
                    .context("replay as of")?;
                progress.0.finish_and_clear();
                warn_not_following(&report);
                let models = projection::ReadModels::open_bucket(&jetstream, 0, &report.bucket)
                    .await?;
                let totals = models.totals().await?;
                if args.json {
                    let value = serde_json::json!({ "report": report, "totals": totals });
                    writeln!(out, "{}", serde_json::to_string(&value)?)?;
                } else {
                    writeln!(
                        out,
                        "bucket {}: {} commits up to INCIDENTS sequence {} (GRIDS {}); {} incidents, {} open",
                        report.bucket,
                        report.commits,
                        report.incidents_sequence,
                        report.grids_sequence,
                        totals.incidents,
                        totals.open
                    )?;
                    for (status, count) in &totals.by_status {
                        writeln!(out, "  {status:<13} {count}")?;
                    }
                }
            }
            ProjectionCommand::DropAsOf(args) => {
                let names = if args.all {
                    projection::as_of_buckets(&jetstream).await?
                } else {
                    args.names
                };
                let mut missing = Vec::new();
                for name in &names {
                    if projection::drop_as_of(&jetstream, name).await? {
                        writeln!(out, "dropped {name}")?;
                    } else {
                        missing.push(name.as_str());
                    }
                }
                anyhow::ensure!(
                    missing.is_empty(),
                    "no as-of bucket {} (`wangge projection status` lists them)",
                    missing.join(", ")
                );
            }
            ProjectionCommand::Status => match projection::ReadModels::current(&jetstream).await? {
                Some(models) => {
                    let checkpoint = models.checkpoint().await?;
                    writeln!(out, "{}", serde_json::to_string(&checkpoint)?)?;
                    let lease = projection::lease::holder(&jetstream).await?;
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({ "builder_lease": lease })
                    )?;
                    let as_of = projection::as_of_buckets(&jetstream).await?;
                    writeln!(out, "{}", serde_json::json!({ "as_of_buckets": as_of }))?;
                }
                None => writeln!(out, "no generation yet (`wangge up` creates the first; `wangge serve projection` builds it)")?,
            },
        }
        client.flush().await.context("flush")?;
        Ok(())
    })
}

/// Creates the projection's buckets (called by `wangge up`): the meta bucket and the current
/// generation's bucket (generation 1 when there is none).
/// Creates the projection's meta bucket and first generation when missing; returns the
/// buckets it holds (meta, current generation) for `up` to apply the settings to.
pub async fn up(settings: &Settings, client: &async_nats::Client) -> anyhow::Result<Vec<String>> {
    let jetstream = async_nats::jetstream::new(client.clone());
    let replicas = settings.store.replicas;
    let meta =
        projection::store::open_bucket(&jetstream, projection::keys::META_BUCKET, replicas).await?;
    let generation = projection::service::current_generation(&meta, &jetstream, replicas).await?;
    writeln!(
        std::io::stdout(),
        "bucket {} ready, current generation {generation} (bucket {})",
        projection::keys::META_BUCKET,
        projection::keys::generation_bucket(generation)
    )
    .context("write to stdout")?;
    Ok(vec![
        projection::keys::META_BUCKET.to_owned(),
        projection::keys::generation_bucket(generation),
    ])
}

/// Says on stderr, in either output mode, which commits a replay could not fold because one
/// before them is missing from the stream.
fn warn_not_following(report: &projection::RebuildReport) {
    if report.commits_not_following == 0 {
        return;
    }
    eprintln!(
        "WARNING: {} INCIDENTS commit(s) did not follow their incident's history (a commit \
         before them is missing from the stream) and were not folded; those incidents stand \
         as of their last commit that followed. First: {}. Run `wangge audit verify`.",
        report.commits_not_following,
        report
            .not_following
            .iter()
            .map(|(sequence, aggregate)| format!("sequence {sequence} ({aggregate})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
