//! `wangge up` and `wangge serve <service>`: the long-running side of wangge.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use eventstore::{BoundedContext, EventStore, PostcardCodec, StreamSpec};
use registry::{RegistryCodec, RegistryService, ServiceConfig};
use tokio::sync::watch;

use crate::config::Settings;

/// Worker threads of a one-off job's runtime (the machines are small; NATS does the scaling).
const JOB_WORKER_THREADS: usize = 2;

/// Creates (or updates in place) the JetStream streams wangge writes to, then exits.
#[derive(Debug, clap::Args)]
#[command(after_long_help = UP_HELP)]
pub struct UpArgs {}

const SERVE_HELP: &str = "\
On SIGINT or SIGTERM the service stops taking requests, answers those it has received,
removes its private stream consumer and exits 0. If that has not finished within 20 s (NATS
unreachable, say), or on a second signal, it exits at once with status 1: what it had not
acknowledged is delivered again to the next instance, and every write is idempotent. Run
several instances of a service for load sharing and failover: request subjects use a NATS
queue group. Example:

    wangge --config /etc/wangge.toml serve registry --instance registry-2";

const UP_HELP: &str = "\
Streams: GRIDS (grids.ev.>), INCIDENTS (incidents.ev.>), INTAKE (intake.ev.>), SUBMISSIONS
(intake.submit.*), NOTIFICATIONS (dispatch.notify.>); buckets INTAKE_CONTACTS,
DISPATCH_SNAPSHOTS and the projection's; each with `store.replicas` replicas (1 on a single server, 3 on a cluster) and a
`store.duplicate_window_seconds` window for idempotent appends. Safe to run again at any time:
existing messages are kept, and existing streams and buckets are brought to these settings
(the only command that changes them: a service starting creates what is missing and leaves
the rest as it is, logging any setting that differs from its own). Prints one line per
stream, and one per setting it changed. Example:

    WANGGE_NATS__URL=nats://10.0.0.5:4222,nats://10.0.0.6:4222 wangge up";

/// Longest `--instance` or `--queue-group`.
const SUBJECT_TOKEN_BYTES_MAX: usize = 64;

/// Checks an `--instance` or `--queue-group`: it becomes part of consumer names and is a
/// queue group, so it must be 1 to 64 bytes of `A-Z a-z 0-9 _ -` (refused before any stream
/// or consumer is touched).
pub fn subject_token(value: &str) -> Result<String, String> {
    let valid = (1..=SUBJECT_TOKEN_BYTES_MAX).contains(&value.len())
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "must be 1 to {SUBJECT_TOKEN_BYTES_MAX} bytes of A-Z a-z 0-9 _ - (it names consumers and a queue group)"
        ))
    }
}

/// Runs one service until SIGINT or SIGTERM.
#[derive(Debug, clap::Args)]
#[command(after_long_help = SERVE_HELP)]
pub struct ServeArgs {
    #[command(subcommand)]
    pub service: ServiceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// The grid registry: communities, buildings, grids and grid workers.
    ///
    /// At start it reads the GRIDS stream to its end and builds the locate index in memory,
    /// then answers (queue group `registry`):
    ///
    ///   grids.locate            {"lon":117.63,"lat":26.26}
    ///                           -> {"status":"served","grid_code":..,"grid_worker":..} |
    ///                              {"status":"unserved"} | {"status":"rejected",..}
    ///   grids.cmd.register_community / update_community
    ///                           {"command_id","community_id","code","name","street",
    ///                            "district","boundary":[[[[lon,lat],..]]]}
    ///   grids.cmd.import_buildings
    ///                           {"command_id","community_id","buildings":[{"id","lon","lat",
    ///                            "households","population"}]}   (at most 2000 per batch)
    ///   grids.cmd.partition     {"command_id","community_id"}
    ///   grids.cmd.assign_grid_worker
    ///                           {"command_id","community_id","grid_code","worker_id","worker_name"}
    ///   grids.query.community   {"community_id"} -> facts + compliance with the `city` profile
    ///
    /// A command is answered only after its events are stored; resending a command id is
    /// answered as a duplicate and writes nothing. See docs/REGISTRY.md.
    #[command(verbatim_doc_comment)]
    Registry(RegistryArgs),
    /// Whistle-and-report dispatch: fires deadlines, takes consoles' commands, notifies
    /// consoles, routes any filing stored without a dispatch (intake routes new filings).
    ///
    /// At start it reads the INCIDENTS stream to its end (after a DISPATCH_SNAPSHOTS KV
    /// snapshot) and rebuilds every pending deadline from the incidents' states, then answers
    /// (queue group `dispatch`):
    ///
    ///   dispatch.cmd.<scope>.<action>
    ///                           scope (the acting role): department.<id> | grid_worker |
    ///                           community | street | district | city | resident
    ///                           action: acknowledge resolve return request_extension
    ///                           approve_extension blow_whistle report_to_whistle verify rate
    ///                           {"command_id","incident","actor":{"id"}, and the
    ///                            action's own fields: resolve "note"; return
    ///                            "return_reason","note"; request_extension "minutes",
    ///                            "reason"; approve_extension "approve","note";
    ///                            blow_whistle "reason"; verify "passed","note";
    ///                            rate "satisfaction","reopen"}
    ///                           -> {"status":"accepted","version",..} |
    ///                              {"status":"rejected","reason_code","message"}
    ///
    /// Notifications go to the NOTIFICATIONS stream, dispatch.notify.department.<id> (and
    /// .city.<code>, .district.<code>, .street.<code>, .community.<code>, .grid.<code>);
    /// a console reads its subject with its
    /// own durable consumer and catches up after being offline. Every commit dispatch stores
    /// is announced on incidents.status.<incident_id> (the public view; see `serve intake`).
    /// See docs/DISPATCH.md.
    #[command(verbatim_doc_comment)]
    Dispatch(DispatchArgs),
    /// Incident intake: turns submissions into filed incidents located in a grid, exactly once.
    ///
    /// At start it reads the INTAKE stream (receipts) and the INCIDENTS stream (open incidents)
    /// to their ends, follows the GRIDS stream in process for locating, then takes:
    ///
    ///   intake.submit.<channel>   durable (SUBMISSIONS stream, header Nats-Msg-Id = submission
    ///                             id); the receipt is announced on intake.receipts.<id>
    ///   intake.request            same submission, the reply is the receipt:
    ///                             {"status":"filed"|"merged","incident_id","grid_code",
    ///                              "respond_by",..} | {"status":"rejected","reason_code",..}
    ///   intake.query.receipt      {"submission_id"} -> the stored receipt
    ///   incidents.query.get       {"incident_id"} -> the incident's public view
    ///   intake.contact.erase      {"reporter_id"} -> contact details purged
    ///
    /// and publishes the changes it stores (filing, merged reporters) on
    /// incidents.status.<incident_id>; dispatch publishes the changes it stores there too.
    /// Schemas: schemas/*.schema.json and schemas/asyncapi.yaml. See docs/INTAKE.md.
    #[command(verbatim_doc_comment)]
    Intake(IntakeArgs),
    /// The projection builder: read models in NATS KV and the query API over them.
    Projection(super::projection::ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Name of this instance (appears in its private stream consumer's name and in logs).
    #[arg(long, default_value = "registry", value_parser = subject_token)]
    pub instance: String,
    /// NATS queue group shared by all registry instances.
    #[arg(long, default_value = "registry", value_parser = subject_token)]
    pub queue_group: String,
}

/// The runtime of a one-off job (`wangge up`, `wangge projection rebuild|as-of|status`),
/// which may fold a whole stream: decoding beside folding is worth a second thread there.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(JOB_WORKER_THREADS)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// The runtime a long-running service (`wangge serve …`) runs on: `runtime.worker_threads`
/// threads, one by default (see [`crate::config::RuntimeSettings`]). Before it starts, the
/// process opts out of transparent huge pages unless `runtime.transparent_huge_pages` is on.
pub(crate) fn service_runtime(settings: &Settings) -> anyhow::Result<tokio::runtime::Runtime> {
    set_transparent_huge_pages(settings.runtime.transparent_huge_pages);
    let threads = settings.runtime.worker_threads;
    assert!(
        (1..=crate::config::WORKER_THREADS_MAX).contains(&threads),
        "settings are validated when loaded"
    );
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder
        .enable_all()
        .build()
        .with_context(|| format!("start the async runtime ({threads} worker threads)"))
}

/// Sets whether this process's memory may be backed by transparent huge pages
/// (`prctl(PR_SET_THP_DISABLE)`: the whole process, from now on). Where the kernel has no
/// such switch the service runs as before, and says so.
fn set_transparent_huge_pages(allowed: bool) {
    #[cfg(target_os = "linux")]
    match rustix::thread::disable_transparent_huge_pages(!allowed) {
        Ok(()) => tracing::debug!(allowed, "transparent huge pages"),
        Err(error) => {
            tracing::warn!(allowed, %error, "could not set runtime.transparent_huge_pages")
        }
    }
    #[cfg(not(target_os = "linux"))]
    if !allowed {
        tracing::debug!("runtime.transparent_huge_pages: no such switch on this system");
    }
}

/// Parses `nats.url`: one or more comma-separated server URLs.
pub fn server_addresses(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let addresses: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .with_context(|| format!("nats.url: {url:?} is not a NATS server URL"))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!addresses.is_empty(), "nats.url names no server");
    Ok(addresses)
}

/// Connects with the settings' servers, credentials and client name.
pub async fn connect(settings: &Settings, role: &str) -> anyhow::Result<async_nats::Client> {
    let addresses = server_addresses(&settings.nats.url)?;
    let nats = &settings.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("{}-{role}", nats.client_name))
        .custom_inbox_prefix(nats.inbox_prefix.clone())
        // One line when the connection is lost and one when it is back: an outage is found
        // in the logs. A permissions violation arrives here too (as a server error).
        .event_callback({
            let user = nats.user.clone().unwrap_or_else(|| "(none)".to_owned());
            move |event| {
                let user = user.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS connection lost; reconnecting")
                        }
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connection established")
                        }
                        // The end of every command's connection: not worth a warning.
                        async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                        async_nats::Event::SlowConsumer(subscription) => {
                            tracing::warn!(subscription, "NATS slow consumer: messages dropped")
                        }
                        // A request the server refuses is otherwise seen only as a timeout,
                        // after minutes of retries: say at once who was refused what.
                        async_nats::Event::ServerError(error)
                            if error.to_string().contains("Permissions Violation") =>
                        {
                            tracing::error!(
                                %error,
                                user,
                                "the server refused this user a subject: see the user's \
                                 permissions in deploy/nats/accounts.conf (replies need \
                                 nats.inbox_prefix = _INBOX_<user>); requests on it time out"
                            )
                        }
                        other => tracing::warn!(event = %other, "NATS"),
                    }
                }
            }
        });
    if let Some(user) = &nats.user
        && nats.inbox_prefix == "_INBOX"
    {
        tracing::warn!(
            user,
            "nats.user is set but nats.inbox_prefix is the default _INBOX: under \
             deploy/nats/accounts.conf a user may only receive replies on its own prefix, and \
             every request would time out; set nats.inbox_prefix = _INBOX_{user} \
             (WANGGE_NATS__INBOX_PREFIX=_INBOX_{user})"
        );
    }
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &nats.tls_ca_file {
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert_file, &nats.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(path) = &settings.nats.credentials {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("read NATS credentials {}", path.display()))?;
    }
    let client = options.connect(addresses).await.with_context(|| {
        let who = match (&nats.user, &nats.credentials) {
            (Some(user), _) => format!("as user {user:?} (nats.user)"),
            (None, Some(path)) => format!("with the credentials {}", path.display()),
            (None, None) => "without a user (nats.user and nats.credentials unset)".to_owned(),
        };
        format!("connect to NATS at {} {who}", settings.nats.url)
    })?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        instance = role,
        url = %settings.nats.url,
        user = nats.user.as_deref().unwrap_or("-"),
        "connected to NATS"
    );
    Ok(client)
}

fn spec(settings: &Settings, context: BoundedContext) -> StreamSpec {
    StreamSpec::for_context(
        context,
        settings.store.replicas,
        Duration::from_secs(settings.store.duplicate_window_seconds),
    )
}

/// Rounds of `wangge up` before it gives up: a cluster that has just started (or is
/// electing a leader) can answer a request with "no responders" or a timeout; every step is
/// create-or-open, so a round repeats safely.
const UP_ATTEMPTS_MAX: usize = 3;
/// Pause between two rounds of `wangge up`.
const UP_RETRY_PAUSE: Duration = Duration::from_secs(1);

pub fn up(settings: &Settings, _args: UpArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let client = connect(settings, "up").await?;
        let mut attempt = 1;
        loop {
            match up_once(settings, &client).await {
                Ok(()) => return Ok(()),
                // JetStream error 10074: replicas > 1 on a server that is not clustered. No
                // retry helps; say what would.
                Err(error) if format!("{error:#}").contains("error code 10074") => {
                    return Err(error.context(format!(
                        "store.replicas = {} needs a JetStream cluster of at least that many \
                         servers, and this server is not clustered; for a single server set \
                         store.replicas = 1 (WANGGE_STORE__REPLICAS=1)",
                        settings.store.replicas
                    )));
                }
                Err(error) if attempt < UP_ATTEMPTS_MAX => {
                    tracing::warn!(
                        error = crate::logging::error_chain(&error),
                        attempt,
                        attempts_max = UP_ATTEMPTS_MAX,
                        "up: a step failed; repeating every step"
                    );
                    attempt += 1;
                    tokio::time::sleep(UP_RETRY_PAUSE).await;
                }
                Err(error) => return Err(error),
            }
        }
    })
}

/// Sets an existing stream's replicas (and duplicate window, when given) to the settings',
/// saying what changed.
async fn apply_replication(
    jetstream: &async_nats::jetstream::Context,
    stream: &str,
    replicas: usize,
    duplicate_window: Option<Duration>,
) -> anyhow::Result<()> {
    let mut found = jetstream.get_stream(stream).await?;
    let mut config = found.info().await?.config.clone();
    let before = (config.num_replicas, config.duplicate_window);
    config.num_replicas = replicas;
    if let Some(window) = duplicate_window {
        config.duplicate_window = window;
    }
    if (config.num_replicas, config.duplicate_window) != before {
        jetstream.update_stream(&config).await?;
        writeln!(
            std::io::stdout(),
            "stream {stream}: replicas {} -> {}, duplicate window {}s -> {}s",
            before.0,
            config.num_replicas,
            before.1.as_secs(),
            config.duplicate_window.as_secs()
        )
        .context("write to stdout")?;
    }
    Ok(())
}

/// One round of `wangge up`: every stream, consumer and bucket, created or opened; every
/// existing one brought to the settings (replicas, duplicate window).
async fn up_once(settings: &Settings, client: &async_nats::Client) -> anyhow::Result<()> {
    let jetstream = async_nats::jetstream::new(client.clone());
    for context in [
        BoundedContext::Grids,
        BoundedContext::Incidents,
        BoundedContext::Intake,
    ] {
        let spec = spec(settings, context);
        // The codec is irrelevant to creating the stream; no event is written here.
        EventStore::open_applying(
            jetstream.clone(),
            spec.clone(),
            PostcardCodec::<()>::new("up"),
        )
        .await
        .with_context(|| format!("create or update stream {}", spec.stream_name))?;
        let mut stream = jetstream
            .get_stream(&spec.stream_name)
            .await
            .with_context(|| format!("read stream {}", spec.stream_name))?;
        let info = stream.info().await?;
        writeln!(
            std::io::stdout(),
            "stream {} ({}): replicas {}, duplicate window {}s, {} messages, ready",
            spec.stream_name,
            spec.all_subjects(),
            info.config.num_replicas,
            info.config.duplicate_window.as_secs(),
            info.state.messages
        )
        .context("write to stdout")?;
    }
    // The services' own streams and buckets, so that their restricted credentials only
    // ever open them (creating R3 streams while six services start can time out).
    let window = Duration::from_secs(settings.store.duplicate_window_seconds);
    let replicas = settings.store.replicas;
    let intake_config = intake::ServiceConfig {
        replicas,
        duplicate_window: window,
        ..intake::ServiceConfig::default()
    };
    let submissions = intake::ensure_submissions_stream(
        &jetstream,
        &intake_config,
        eventstore::ExistingStream::Update,
    )
    .await
    .context("create or update stream SUBMISSIONS")?;
    intake::service::ensure_submissions_consumer(&submissions, &intake_config)
        .await
        .context("create the SUBMISSIONS consumer of intake")?;
    intake::service::ensure_contacts_bucket(&jetstream, &intake_config)
        .await
        .context("create bucket INTAKE_CONTACTS")?;
    dispatch::notify::open_stream(&jetstream, replicas, window)
        .await
        .map_err(anyhow::Error::msg)
        .context("create stream NOTIFICATIONS")?;
    let snapshots = dispatch::DispatchConfig::new(settings.policy()?)
        .snapshot_bucket
        .unwrap_or_default();
    eventstore::SnapshotStore::open(&jetstream, &snapshots, replicas)
        .await
        .with_context(|| format!("create bucket {snapshots}"))?;
    writeln!(
        std::io::stdout(),
        "stream SUBMISSIONS (consumer {}), stream NOTIFICATIONS, buckets {} and {snapshots}: ready",
        intake_config.submissions_durable,
        intake_config.contacts_bucket
    )
    .context("write to stdout")?;
    let projection_buckets = super::projection::up(settings, client)
        .await
        .context("create the projection's buckets")?;
    // Streams and buckets opened above only when missing: apply the replicas (and the
    // duplicate window where Msg-Id deduplication matters) to the existing ones too.
    let mut applied = vec![(
        dispatch::notify::NOTIFICATIONS_STREAM.to_owned(),
        Some(window),
    )];
    for bucket in [intake_config.contacts_bucket.clone(), snapshots.clone()]
        .into_iter()
        .chain(projection_buckets)
    {
        applied.push((format!("KV_{bucket}"), None));
    }
    for (stream, duplicate_window) in applied {
        apply_replication(&jetstream, &stream, replicas, duplicate_window)
            .await
            .with_context(|| format!("apply the settings to stream {stream}"))?;
    }
    client.flush().await.context("flush")?;
    Ok(())
}

/// Resolves when SIGINT or SIGTERM arrives.
pub(crate) async fn termination() -> anyhow::Result<&'static str> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            result.context("listen for SIGINT")?;
            Ok("SIGINT")
        }
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}

pub fn serve(settings: &Settings, args: ServeArgs) -> anyhow::Result<()> {
    let (service, instance) = match &args.service {
        ServiceCommand::Registry(args) => ("registry", args.instance.clone()),
        ServiceCommand::Dispatch(args) => ("dispatch", args.instance.clone()),
        ServiceCommand::Intake(args) => ("intake", args.instance.clone()),
        ServiceCommand::Projection(args) => ("projection", args.instance.clone()),
    };
    // Every line logged on this thread names the service and the instance (the runtime's
    // thread with the default one worker thread: all of them), so that two instances on one
    // host, or a collector's merged stream, can be told apart.
    let span = tracing::info_span!("serve", service, instance = %instance);
    let _in_span = span.enter();
    match args.service {
        ServiceCommand::Registry(registry_args) => serve_registry(settings, registry_args),
        ServiceCommand::Dispatch(dispatch_args) => serve_dispatch(settings, dispatch_args),
        ServiceCommand::Intake(intake_args) => serve_intake(settings, intake_args),
        ServiceCommand::Projection(projection_args) => {
            super::projection::serve(settings, projection_args)
        }
    }
}

fn serve_registry(settings: &Settings, args: RegistryArgs) -> anyhow::Result<()> {
    let profile = standards::builtin(&settings.city)
        .with_context(|| format!("load the standards profile of city {:?}", settings.city))?;
    service_runtime(settings)?.block_on(async {
        // Listen before the (possibly long) catch-up so a signal during it is not lost.
        let (signals, stopped) = stop_on_signal();
        let client = connect(settings, &args.instance).await?;
        let store = EventStore::open(
            async_nats::jetstream::new(client.clone()),
            spec(settings, BoundedContext::Grids),
            RegistryCodec,
        )
        .await
        .context("open the GRIDS stream")?
        .with_commit_format(settings.store.commit_format);
        let observer = observe_service(
            settings,
            "registry",
            &args.instance,
            &client,
            &[&store.spec().stream_name],
            &stopped,
        )
        .await?;
        let mut config = ServiceConfig::new(profile);
        config.instance = args.instance;
        config.queue_group = args.queue_group;
        config.observer = observer;
        let service = tokio::select! {
            started = RegistryService::start(client, store, config) => started.context("start the registry")?,
            _ = wait_stopped(stopped.clone()) => {
                tracing::info!("stopped during start");
                return Ok(());
            }
        };
        service.run(stopped).await.context("registry")?;
        signals.abort();
        Ok(())
    })
}

/// The service's [`observe::Observer`]: the metrics and health endpoint (when
/// `observe.metrics_address` is set) and the lag poller over `streams`, both until `stopped`.
pub(crate) async fn observe_service(
    settings: &Settings,
    service: &str,
    instance: &str,
    client: &async_nats::Client,
    streams: &[&str],
    stopped: &watch::Receiver<bool>,
) -> anyhow::Result<observe::Observer> {
    let observer = observe::Observer::new(service, instance);
    observer.watch_connection(client);
    let address = settings.observe.metrics_address.trim();
    if !address.is_empty() {
        observe::serve_http(address, observer.clone(), stopped.clone())
            .await
            .context("start the metrics and health endpoint (observe.metrics_address)")?;
    }
    observe::spawn_lag_refresh(
        async_nats::jetstream::new(client.clone()),
        streams.iter().map(|stream| (*stream).to_owned()).collect(),
        Duration::from_secs(settings.observe.lag_refresh_seconds),
        observer.clone(),
        stopped.clone(),
    );
    Ok(observer)
}

/// Resolves when `stopped` turns true (or its sender is gone).
pub(crate) async fn wait_stopped(mut stopped: watch::Receiver<bool>) {
    while !*stopped.borrow() {
        if stopped.changed().await.is_err() {
            return;
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DispatchArgs {
    /// Name of this instance (appears in its private stream consumer's name and in logs).
    #[arg(long, default_value = "dispatch", value_parser = subject_token)]
    pub instance: String,
    /// NATS queue group shared by all dispatch instances.
    #[arg(long, default_value = "dispatch", value_parser = subject_token)]
    pub queue_group: String,
    /// Compressed time for tests and demos: `now = origin + (wall - origin) * scale`.
    #[arg(long, hide = true, requires = "time_origin_ms")]
    pub time_scale: Option<u32>,
    /// Origin (Unix ms) of the compressed time; every instance must be given the same.
    #[arg(long, hide = true)]
    pub time_origin_ms: Option<i64>,
    /// Under load, the longest wait (milliseconds) of a loop turn for more INCIDENTS commits,
    /// so that the incidents filed meanwhile are dispatched as one batch. Waits only when at
    /// least 16 commits are already buffered and the server holds more; 0 never waits.
    /// [default: setting `dispatch.deliveries_fill_wait_ms`, 2]
    #[arg(
        long,
        value_parser = clap::value_parser!(u64)
            .range(0..=dispatch::service::DELIVERIES_FILL_WAIT_MAX.as_millis() as u64)
    )]
    pub deliveries_fill_wait_ms: Option<u64>,
}

impl DispatchArgs {
    /// The `[dispatch]` settings with this command line's flags laid over them.
    fn over(&self, settings: &crate::config::DispatchSettings) -> crate::config::DispatchSettings {
        let mut merged = settings.clone();
        if let Some(wait) = self.deliveries_fill_wait_ms {
            merged.deliveries_fill_wait_ms = wait;
        }
        merged
    }
}

fn serve_dispatch(settings: &Settings, args: DispatchArgs) -> anyhow::Result<()> {
    let tuning = args.over(&settings.dispatch);
    tuning.validate()?;
    let policy = settings.policy()?;
    service_runtime(settings)?.block_on(async {
        // Listen before the (possibly long) catch-up so a signal during it is not lost.
        let (signals, stopped) = stop_on_signal();
        let client = connect(settings, &args.instance).await?;
        let store = EventStore::open(
            async_nats::jetstream::new(client.clone()),
            spec(settings, BoundedContext::Incidents),
            dispatch::IncidentCodec,
        )
        .await
        .context("open the INCIDENTS stream")?
        .with_commit_format(settings.store.commit_format);
        let observer = observe_service(
            settings,
            "dispatch",
            &args.instance,
            &client,
            &[&store.spec().stream_name],
            &stopped,
        )
        .await?;
        let mut config = dispatch::DispatchConfig::new(policy);
        config.observer = observer;
        config.instance = args.instance;
        config.queue_group = args.queue_group;
        config.deliveries_fill_wait = Duration::from_millis(tuning.deliveries_fill_wait_ms);
        config.replicas = settings.store.replicas;
        config.duplicate_window = Duration::from_secs(settings.store.duplicate_window_seconds);
        if let (Some(scale), Some(origin_ms)) = (args.time_scale, args.time_origin_ms) {
            config.time = dispatch::TimeSource::Scaled { origin_ms, scale };
            config.deadline_poll_max = Duration::from_millis(50);
        }
        let service = tokio::select! {
            started = dispatch::DispatchService::start(client, store, config) => started.context("start dispatch")?,
            _ = wait_stopped(stopped.clone()) => {
                tracing::info!("stopped during start");
                return Ok(());
            }
        };
        service.run(stopped).await.context("dispatch")?;
        signals.abort();
        Ok(())
    })
}

#[derive(Debug, clap::Args)]
pub struct IntakeArgs {
    /// Name of this instance (appears in its private stream consumers' names and in logs).
    #[arg(long, default_value = "intake", value_parser = subject_token)]
    pub instance: String,
    /// NATS queue group shared by all intake instances.
    #[arg(long, default_value = "intake", value_parser = subject_token)]
    pub queue_group: String,
    /// A report of the same category within this many metres of an open incident is merged;
    /// 0 merges nothing. [default: setting `intake.dedup_radius_m`, 50]
    #[arg(long)]
    pub dedup_radius_m: Option<f64>,
    /// ... if that incident was reported at most this many minutes before.
    /// [default: setting `intake.dedup_window_minutes`, 4320]
    #[arg(long)]
    pub dedup_window_minutes: Option<i64>,
    /// Submissions one reporter may send in a burst (rate limit).
    /// [default: setting `intake.rate_burst`, 10]
    #[arg(long)]
    pub rate_burst: Option<u32>,
    /// Seconds for one more submission to be allowed after the burst (rate limit).
    /// [default: setting `intake.rate_refill_seconds`, 360]
    #[arg(long)]
    pub rate_refill_seconds: Option<i64>,
    /// Under load, the longest wait (milliseconds) for a batch of submissions to fill before
    /// it is decided and stored; larger batches store more per second. 0 never waits. A lone
    /// submission never waits. [default: setting `intake.batch_fill_wait_ms`, 2]
    #[arg(
        long,
        value_parser = clap::value_parser!(u64).range(0..=intake::BATCH_FILL_WAIT_MAX.as_millis() as u64)
    )]
    pub batch_fill_wait_ms: Option<u64>,
    /// Compressed time for tests and demos, as `serve dispatch --time-scale`: a submission is
    /// decided (and its deadlines set) at `origin + (arrival - origin) * scale`. Give intake
    /// and dispatch the same scale and origin.
    #[arg(long, hide = true, requires = "time_origin_ms")]
    pub time_scale: Option<u32>,
    /// Origin (Unix ms) of the compressed time.
    #[arg(long, hide = true)]
    pub time_origin_ms: Option<i64>,
}

impl IntakeArgs {
    /// The `[intake]` settings with this command line's flags laid over them.
    fn over(&self, settings: &crate::config::IntakeSettings) -> crate::config::IntakeSettings {
        let mut merged = settings.clone();
        if let Some(radius) = self.dedup_radius_m {
            merged.dedup_radius_m = radius;
        }
        if let Some(minutes) = self.dedup_window_minutes {
            merged.dedup_window_minutes = minutes;
        }
        if let Some(burst) = self.rate_burst {
            merged.rate_burst = burst;
        }
        if let Some(seconds) = self.rate_refill_seconds {
            merged.rate_refill_seconds = seconds;
        }
        if let Some(wait) = self.batch_fill_wait_ms {
            merged.batch_fill_wait_ms = wait;
        }
        merged
    }
}

fn serve_intake(settings: &Settings, args: IntakeArgs) -> anyhow::Result<()> {
    let tuning = args.over(&settings.intake);
    tuning.validate()?;
    let policy = settings.policy()?;
    let profile = standards::builtin(&settings.city)
        .with_context(|| format!("load the standards profile of city {:?}", settings.city))?;
    service_runtime(settings)?.block_on(async {
        // Listen before the (possibly long) catch-up so a signal during it is not lost.
        let (signals, stopped) = stop_on_signal();
        let client = connect(settings, &args.instance).await?;
        let jetstream = async_nats::jetstream::new(client.clone());
        // Intake only reads GRIDS: open it as it is (the deploy credentials of intake may not
        // manage it), creating it only when it does not exist yet.
        let grids = match EventStore::open_existing(
            jetstream.clone(),
            spec(settings, BoundedContext::Grids),
            RegistryCodec,
        )
        .await
        {
            Ok(grids) => grids,
            Err(_) => EventStore::open(
                jetstream.clone(),
                spec(settings, BoundedContext::Grids),
                RegistryCodec,
            )
            .await
            .context("open the GRIDS stream")?,
        };
        let incidents = EventStore::open(
            jetstream.clone(),
            spec(settings, BoundedContext::Incidents),
            intake::IncidentCodec,
        )
        .await
        .context("open the INCIDENTS stream")?
        .with_commit_format(settings.store.commit_format);
        let receipts = EventStore::open(
            jetstream,
            spec(settings, BoundedContext::Intake),
            intake::IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
        )
        .await
        .context("open the INTAKE stream")?
        .with_commit_format(settings.store.commit_format);
        // The registry in process, only following GRIDS, for locating.
        let mut registry_config = ServiceConfig::new(profile);
        registry_config.instance = format!("{}-grids", args.instance);
        registry_config.serve_requests = false;
        let observer = observe_service(
            settings,
            "intake",
            &args.instance,
            &client,
            &[&incidents.spec().stream_name],
            &stopped,
        )
        .await?;
        let config = intake::ServiceConfig {
            observer,
            instance: args.instance,
            queue_group: args.queue_group,
            replicas: settings.store.replicas,
            duplicate_window: Duration::from_secs(settings.store.duplicate_window_seconds),
            batch_fill_wait: Duration::from_millis(tuning.batch_fill_wait_ms),
            time: match (args.time_scale, args.time_origin_ms) {
                (Some(scale), Some(origin_ms)) => {
                    intake::DecisionTime::Compressed { origin_ms, scale }
                }
                _ => intake::DecisionTime::Wall,
            },
            core: intake::CoreConfig {
                dedup_radius_m: tuning.dedup_radius_m,
                dedup_window_ms: tuning.dedup_window_minutes.saturating_mul(60_000),
                rate_burst: tuning.rate_burst,
                rate_refill_ms: tuning.rate_refill_seconds.saturating_mul(1000),
                ..intake::CoreConfig::default()
            },
            ..intake::ServiceConfig::default()
        };
        let started = async {
            let registry = RegistryService::start(client.clone(), grids, registry_config)
                .await
                .context("start the in-process registry")?;
            let locator = registry.locator();
            let service = intake::IntakeService::start(
                client,
                incidents,
                receipts,
                policy,
                Box::new(locator),
                config,
            )
            .await
            .context("start intake")?;
            anyhow::Ok((registry, service))
        };
        let (registry, service) = tokio::select! {
            started = started => started?,
            _ = wait_stopped(stopped.clone()) => {
                tracing::info!("stopped during start");
                return Ok(());
            }
        };
        // Intake locates through the registry in this process: if the registry stops (a
        // commit it cannot read, a reload that fails), intake must stop too, rather than go
        // on locating from a view that no longer changes; and if intake stops (an error, a
        // panic), the process must not live on as a registry alone that looks healthy. A
        // signal, or the end of either, stops both; the process then exits with the error.
        let (stop_intake, intake_stopped) = watch::channel(false);
        let (stop_registry, registry_stopped) = watch::channel(false);
        let mut registry_task = tokio::spawn(registry.run(registry_stopped));
        let mut intake_task = tokio::spawn(service.run(intake_stopped));
        let (registry_ended, intake_ended) = tokio::select! {
            () = wait_stopped(stopped.clone()) => (None, None),
            ended = &mut registry_task => (Some(ended), None),
            ended = &mut intake_task => (None, Some(ended)),
        };
        let _ = stop_intake.send(true);
        let _ = stop_registry.send(true);
        let signalled = *stopped.borrow();
        let intake_ended_first = intake_ended.is_some();
        let intake_result = match intake_ended {
            Some(ended) => ended,
            None => intake_task.await,
        };
        let registry_result = match registry_ended {
            Some(ended) => ended,
            None => registry_task.await,
        };
        match registry_result.context("registry task")? {
            Ok(()) if !signalled && !intake_ended_first => {
                anyhow::bail!("the in-process registry stopped; intake stopped with it")
            }
            Ok(()) => {}
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context("in-process registry (intake stopped with it)"));
            }
        }
        match intake_result.context("intake task")? {
            Ok(()) if !signalled => {
                anyhow::bail!("intake stopped on its own; its in-process registry stopped with it")
            }
            Ok(()) => {}
            Err(error) => return Err(anyhow::Error::new(error).context("intake")),
        }
        signals.abort();
        Ok(())
    })
}

/// How long a stop may take after the signal before the process exits anyway (under
/// systemd's `TimeoutStopSec=30` and Kubernetes' 30 s grace, so the last log line is ours).
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Starts listening for SIGINT/SIGTERM; the receiver turns `true` when one arrives. The
/// returned task then waits up to [`SHUTDOWN_GRACE`] (or a second signal) and exits the
/// process; abort it when the service stopped in time or for another reason.
pub(crate) fn stop_on_signal() -> (tokio::task::JoinHandle<()>, watch::Receiver<bool>) {
    let (stop, stopped) = watch::channel(false);
    let signals = tokio::spawn(async move {
        match termination().await {
            Ok(signal) => tracing::info!(signal, "shutting down"),
            Err(error) => tracing::error!(error = format!("{error:#}"), "signal handling"),
        }
        let _ = stop.send(true);
        // The stop itself talks to NATS (acks, deleting the private consumer, a snapshot);
        // with NATS unreachable it would wait for the reconnection. Bound it, and let a
        // second signal cut it short. This task is aborted when the service stopped in time.
        let reason = tokio::select! {
            () = tokio::time::sleep(SHUTDOWN_GRACE) => "the stop took longer than the grace",
            second = termination() => match second {
                Ok(_) => "a second signal",
                Err(_) => "signal handling failed",
            },
        };
        tracing::error!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            reason,
            "exiting before the stop finished; unacknowledged work is delivered again"
        );
        std::process::exit(1);
    });
    (signals, stopped)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use expect_test::{Expect, expect};

    use super::*;
    use crate::config::{DispatchSettings, IntakeSettings};

    #[derive(Debug, clap::Parser)]
    enum Serve {
        Intake(IntakeArgs),
        Dispatch(DispatchArgs),
    }

    /// `wangge serve <flags>`'s tuning: the settings (as a file with `rate_burst = 50` and fill
    /// waits of 7 ms gives them) with the flags laid over them, validated.
    fn check(flags: &[&str], expect: Expect) {
        let intake_file = IntakeSettings {
            rate_burst: 50,
            batch_fill_wait_ms: 7,
            ..IntakeSettings::default()
        };
        let dispatch_file = DispatchSettings {
            deliveries_fill_wait_ms: 7,
        };
        let shown =
            match Serve::try_parse_from(std::iter::once("serve").chain(flags.iter().copied())) {
                Err(error) => format!("flag error: {}", error.kind()),
                Ok(Serve::Intake(args)) => {
                    let merged = args.over(&intake_file);
                    match merged.validate() {
                        Ok(()) => format!("{merged:?}"),
                        Err(error) => format!("error: {error}"),
                    }
                }
                Ok(Serve::Dispatch(args)) => {
                    let merged = args.over(&dispatch_file);
                    match merged.validate() {
                        Ok(()) => format!("{merged:?}"),
                        Err(error) => format!("error: {error}"),
                    }
                }
            };
        expect.assert_eq(&shown);
    }

    #[test]
    fn flags_override_the_settings_and_meet_the_same_bounds() {
        check(
            &["intake"],
            expect![
                "IntakeSettings { dedup_radius_m: 50.0, dedup_window_minutes: 4320, rate_burst: 50, rate_refill_seconds: 360, batch_fill_wait_ms: 7 }"
            ],
        );
        check(
            &["intake", "--rate-burst", "3", "--dedup-radius-m", "0"],
            expect![
                "IntakeSettings { dedup_radius_m: 0.0, dedup_window_minutes: 4320, rate_burst: 3, rate_refill_seconds: 360, batch_fill_wait_ms: 7 }"
            ],
        );
        check(
            &["intake", "--dedup-radius-m", "5000"],
            expect![
                "error: intake.dedup_radius_m (--dedup-radius-m) must be between 0 and 1000 metres, got 5000"
            ],
        );
        check(
            &["intake", "--batch-fill-wait-ms", "2000"],
            expect!["flag error: invalid value for one of the arguments"],
        );
        check(
            &["dispatch"],
            expect!["DispatchSettings { deliveries_fill_wait_ms: 7 }"],
        );
        check(
            &["dispatch", "--deliveries-fill-wait-ms", "0"],
            expect!["DispatchSettings { deliveries_fill_wait_ms: 0 }"],
        );
    }
}
