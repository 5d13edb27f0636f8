//! Settings: built-in defaults, then the TOML file, then `WANGGE_*` environment variables.
//!
//! Nested keys use a double underscore in the environment: `[nats] url` is
//! `WANGGE_NATS__URL`, `[store] replicas` is `WANGGE_STORE__REPLICAS`. Unknown keys in the
//! file are an error, so a typo does not silently fall back to a default.

use std::path::Path;

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::logging::LogFormat;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    pub store: StoreSettings,
    pub log: LogSettings,
    pub observe: ObserveSettings,
    pub intake: IntakeSettings,
    pub dispatch: DispatchSettings,
    pub projection: ProjectionSettings,
    pub runtime: RuntimeSettings,
    /// Which city's data files (routing, calendar, standards) the services load.
    pub city: String,
    pub policy: PolicySettings,
}

/// `[policy]`: files that replace the city's built-in data (`config/` in the source tree),
/// e.g. next year's holidays from the State Council's notice. Unset: built in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// The event categories (the shape of `config/categories.toml`).
    pub categories_file: Option<std::path::PathBuf>,
    /// Who handles what, and the deadlines (the shape of `config/cities/<city>/routing.toml`).
    pub routing_file: Option<std::path::PathBuf>,
    /// Working hours, holidays and make-up working days (the shape of
    /// `config/cities/<city>/calendar.toml`).
    pub calendar_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Comma-separated server URLs.
    pub url: String,
    /// Optional credentials file (NATS decentralised auth).
    pub credentials: Option<std::path::PathBuf>,
    /// Name this client reports to the server (shows in `nats server report connections`).
    pub client_name: String,
    /// User and password (deploy/nats/accounts.conf: one user per role). Prefer the
    /// environment for the password: `WANGGE_NATS__PASSWORD`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Prefix of this client's reply inboxes. The deploy accounts let each user subscribe
    /// only to `_INBOX_<user>.>`, so no one reads another's replies: set `_INBOX_<user>`.
    pub inbox_prefix: String,
    /// CA certificate (PEM) to verify the servers with; setting it requires TLS.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients (mutual TLS).
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
}

/// Operational signals of a running service (`wangge serve ...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObserveSettings {
    /// Address of the HTTP endpoint with `/metrics` (Prometheus text) and `/healthz`;
    /// empty (the default, so several services on one host never clash): none. Set it per
    /// service, e.g. `WANGGE_OBSERVE__METRICS_ADDRESS=0.0.0.0:9464`. Port 0 picks a free
    /// port (logged at start). A port already taken stops the service at start.
    pub metrics_address: String,
    /// Register as a NATS micro service (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`). Always true:
    /// the request subjects are micro-service endpoints; `false` is refused at start (kept as
    /// a key so that a file naming it still loads).
    pub micro_service: bool,
    /// How often stream lag (stream end minus the service's reached sequence) is refreshed.
    pub lag_refresh_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// JetStream replicas for every stream: 1 (single node) or 3 (cluster).
    pub replicas: usize,
    /// Window in which JetStream drops a repeated `Nats-Msg-Id`, in seconds.
    pub duplicate_window_seconds: u64,
    /// How the writing services store a commit's envelope: `body` (format 2, the default)
    /// or `headers` (format 1, what builds before format 2 wrote and the only one they
    /// read). Every build reads both. A city upgrading from such a build sets `headers`
    /// until every service runs the new build, then removes it (ARCHITECTURE.md,
    /// "Upgrades").
    pub commit_format: eventstore::CommitFormat,
}

/// `[intake]`: how `wangge serve intake` files reports. Its flags of the same name override.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeSettings {
    /// A report of the same category within this many metres of an open incident is merged
    /// into it; 0 merges nothing. At most [`DEDUP_RADIUS_MAX_M`].
    pub dedup_radius_m: f64,
    /// ... if that incident was reported at most this many minutes before. At most
    /// [`DEDUP_WINDOW_MAX_MINUTES`].
    pub dedup_window_minutes: i64,
    /// Submissions one reporter may send in a burst (rate limit), 1 to [`RATE_BURST_MAX`].
    pub rate_burst: u32,
    /// Seconds for one more submission to be allowed after the burst, 1 to
    /// [`RATE_REFILL_MAX_SECONDS`].
    pub rate_refill_seconds: i64,
    /// Under load, the longest wait for a batch of submissions to fill before it is decided
    /// and stored (milliseconds; 0 never waits; at most `intake::BATCH_FILL_WAIT_MAX`).
    pub batch_fill_wait_ms: u64,
}

/// `[dispatch]`: how `wangge serve dispatch` batches. Its flags of the same name override.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Under load, the longest wait of a loop turn for more INCIDENTS commits, so that the
    /// incidents filed meanwhile are dispatched as one batch (milliseconds; 0 never waits; at
    /// most `dispatch::service::DELIVERIES_FILL_WAIT_MAX`).
    pub deliveries_fill_wait_ms: u64,
}

/// `[projection]`: the weights of the three rates in the scorecards' score, for
/// `wangge serve projection`, `projection rebuild` and `projection as-of` alike, so a rebuild
/// scores as the service does. Their flags of the same name (`--weight-response` …) override.
/// No seed document gives figures (docs/PROJECTION.md), hence equal weights by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectionSettings {
    /// Weight of the response rate (响应率), 0 to [`SCORE_WEIGHT_MAX`].
    pub weight_response: f64,
    /// Weight of the resolution rate (解决率), 0 to [`SCORE_WEIGHT_MAX`].
    pub weight_resolution: f64,
    /// Weight of the satisfaction rate (满意率), 0 to [`SCORE_WEIGHT_MAX`].
    pub weight_satisfaction: f64,
}

/// Largest scorecard weight (only their ratios matter; a bound keeps the sum finite).
pub const SCORE_WEIGHT_MAX: f64 = 1_000.0;

impl Default for ProjectionSettings {
    fn default() -> Self {
        ProjectionSettings {
            weight_response: 1.0,
            weight_resolution: 1.0,
            weight_satisfaction: 1.0,
        }
    }
}

impl ProjectionSettings {
    /// Refuses weights outside their bounds, or all zero, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (key, weight) in [
            ("weight_response", self.weight_response),
            ("weight_resolution", self.weight_resolution),
            ("weight_satisfaction", self.weight_satisfaction),
        ] {
            anyhow::ensure!(
                weight.is_finite() && (0.0..=SCORE_WEIGHT_MAX).contains(&weight),
                "projection.{key} (--{}) must be between 0 and {SCORE_WEIGHT_MAX}, got {weight}",
                key.replace('_', "-")
            );
        }
        anyhow::ensure!(
            self.weight_response + self.weight_resolution + self.weight_satisfaction > 0.0,
            "at least one scorecard weight (projection.weight_response, weight_resolution, \
             weight_satisfaction) must be positive"
        );
        Ok(())
    }
}

/// `[runtime]`: how a long-running service (`wangge serve …`) runs its async tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Threads of a service's runtime, 1 to [`WORKER_THREADS_MAX`]. With 1 (the default) the
    /// service's loop and its NATS connection share one thread: a service decides in one loop
    /// anyway, and on a small machine shared with nats-server that saves the wake-ups and
    /// context switches of handing every message between threads (docs/BENCHMARKS.md,
    /// "Session 12"). With 2 or more, a multi-threaded runtime with that many workers.
    pub worker_threads: usize,
    /// Whether the service's heap may be backed by transparent huge pages (Linux). Off by
    /// default: the allocator asks for them on every arena, and a service whose read models
    /// grow (a hash table doubling, memory handed back and taken again) then has the kernel
    /// zero a whole 2 MiB page at each first touch. On the 2-core benchmark machine that
    /// zeroing was 6.5% of all CPU time in the pipeline, and turning it off gave about 12% more
    /// incidents per second (docs/BENCHMARKS.md, "Session 20"). Turn it on for a service
    /// whose heap is large and settled, where fewer TLB misses may pay.
    pub transparent_huge_pages: bool,
}

/// Largest `runtime.worker_threads`.
pub const WORKER_THREADS_MAX: usize = 64;

/// Largest `intake.dedup_radius_m`: a wider circle merges reports of different places.
pub const DEDUP_RADIUS_MAX_M: f64 = 1_000.0;
/// Largest `intake.dedup_window_minutes` (30 days).
pub const DEDUP_WINDOW_MAX_MINUTES: i64 = 30 * 24 * 60;
/// Largest `intake.rate_burst`.
pub const RATE_BURST_MAX: u32 = 10_000;
/// Largest `intake.rate_refill_seconds` (one day).
pub const RATE_REFILL_MAX_SECONDS: i64 = 86_400;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,wangge=debug`.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            store: StoreSettings::default(),
            log: LogSettings::default(),
            observe: ObserveSettings::default(),
            intake: IntakeSettings::default(),
            dispatch: DispatchSettings::default(),
            projection: ProjectionSettings::default(),
            runtime: RuntimeSettings::default(),
            city: "sanming".to_owned(),
            policy: PolicySettings::default(),
        }
    }
}

impl Default for IntakeSettings {
    fn default() -> Self {
        IntakeSettings {
            dedup_radius_m: intake::core::DEDUP_RADIUS_M,
            dedup_window_minutes: intake::core::DEDUP_WINDOW_MS / 60_000,
            rate_burst: intake::core::RATE_BURST,
            rate_refill_seconds: intake::core::RATE_REFILL_MS / 1000,
            batch_fill_wait_ms: intake::BATCH_FILL_WAIT.as_millis() as u64,
        }
    }
}

impl Default for DispatchSettings {
    fn default() -> Self {
        DispatchSettings {
            deliveries_fill_wait_ms: dispatch::service::DELIVERIES_FILL_WAIT.as_millis() as u64,
        }
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            worker_threads: 1,
            transparent_huge_pages: false,
        }
    }
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials: None,
            client_name: "wangge".to_owned(),
            user: None,
            password: None,
            inbox_prefix: "_INBOX".to_owned(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for ObserveSettings {
    fn default() -> Self {
        ObserveSettings {
            metrics_address: String::new(),
            micro_service: true,
            lag_refresh_seconds: 5,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            replicas: 1,
            duplicate_window_seconds: 120,
            commit_format: eventstore::CommitFormat::Body,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Pretty,
            filter: "info,async_nats=warn".to_owned(),
        }
    }
}

/// Flat variables that are not settings keys (they are read by clap, scripts or tests).
const ENV_NOT_SETTINGS: [&str; 7] = [
    "config",
    "log_format",
    "nats_server",
    "deploy_check_offline",
    "sim_seed",
    "sim_seeds",
    "write_golden",
];
/// Settings whose values are text, by their key in the environment (after `WANGGE_`): they
/// are taken verbatim. Parsed as figment parses the rest, a password `123456` would be a
/// number and refused, `"secret"` would lose its quotes and `  x  ` its spaces.
const ENV_TEXT_KEYS: [&str; 15] = [
    "policy__categories_file",
    "policy__routing_file",
    "policy__calendar_file",
    "nats__url",
    "nats__credentials",
    "nats__client_name",
    "nats__user",
    "nats__password",
    "nats__inbox_prefix",
    "nats__tls_ca_file",
    "nats__tls_cert_file",
    "nats__tls_key_file",
    "log__filter",
    "observe__metrics_address",
    "city",
];
/// Largest `store.duplicate_window_seconds`: the age of SUBMISSIONS and NOTIFICATIONS
/// messages (30 days), which JetStream requires the window not to pass.
pub const DUPLICATE_WINDOW_MAX_SECONDS: u64 = intake::SUBMISSIONS_MAX_AGE.as_secs();

/// The text settings among `variables` (name, value), verbatim, as (dotted key, value):
/// `WANGGE_NATS__PASSWORD=007` is `("nats.password", "007")`.
fn text_settings_from(
    variables: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for (name, value) in variables {
        let Some(name) = name.to_str() else { continue };
        let Some(key) = name
            .get(..7)
            .filter(|prefix| prefix.eq_ignore_ascii_case("WANGGE_"))
            .map(|_| name[7..].to_lowercase())
        else {
            continue;
        };
        if !ENV_TEXT_KEYS.contains(&key.as_str()) {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| anyhow::anyhow!("environment variable {name} is not valid UTF-8"))?;
        found.push((key.replace("__", "."), value));
    }
    Ok(found)
}
/// Families of variables the deployment files give the NATS servers (`deploy/`): an operator
/// who sources such a file before running `wangge` must not see them refused as settings.
const ENV_DEPLOY_PREFIXES: [&str; 2] = ["nats_pass_", "nats_server_name"];

/// The built-in cities: those with both a dispatch policy and a standards profile.
fn cities() -> Vec<&'static str> {
    domain::policy::EMBEDDED_CITIES
        .iter()
        .copied()
        .filter(|city| standards::CITIES.contains(city))
        .collect()
}

/// A settings error from figment, in the operator's terms: an unknown key names the file or
/// the exact environment variable it came from, and the keys that would be accepted.
fn explain(error: figment::Error, source: &str) -> anyhow::Error {
    let messages: Vec<String> = error
        .into_iter()
        .map(|error| {
            let path: Vec<&str> = error
                .path
                .iter()
                .map(String::as_str)
                .filter(|part| *part != "default")
                .collect();
            let key = path.join(".").to_lowercase();
            let from_env = error
                .metadata
                .as_ref()
                .is_some_and(|metadata| metadata.name.contains("environment"));
            let origin = if from_env {
                format!(
                    "environment variable WANGGE_{}",
                    path.join("__").to_uppercase()
                )
            } else {
                error
                    .metadata
                    .as_ref()
                    .and_then(|metadata| metadata.source.as_ref())
                    .map_or_else(|| source.to_owned(), |found| found.to_string())
            };
            match &error.kind {
                figment::error::Kind::UnknownField(_, expected) => format!(
                    "unknown setting {key:?} (from {origin}); {} are: {}",
                    if path.len() > 1 {
                        format!("the keys of [{}]", path[..path.len() - 1].join("."))
                    } else {
                        "the top-level keys".to_owned()
                    },
                    expected.join(", ")
                ),
                // Not about one key: a file that is not TOML at all.
                kind if key.is_empty() => format!("{origin}: {kind}"),
                kind => format!("setting {key:?} (from {origin}): {kind}"),
            }
        })
        .collect();
    anyhow::anyhow!("{}", messages.join("; "))
}

impl Settings {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = path {
            anyhow::ensure!(
                path.is_file(),
                "config file {} {}",
                path.display(),
                if path.exists() {
                    "is not a file"
                } else {
                    "does not exist"
                }
            );
            figment = figment.merge(Toml::file_exact(path));
        }
        let ignored: Vec<&str> = ENV_NOT_SETTINGS
            .iter()
            .chain(&ENV_TEXT_KEYS)
            .copied()
            .collect();
        let mut figment = figment.merge(
            Env::prefixed("WANGGE_")
                .ignore(&ignored)
                .filter(|key| {
                    !ENV_DEPLOY_PREFIXES
                        .iter()
                        .any(|prefix| key.as_str().to_lowercase().starts_with(prefix))
                })
                .split("__"),
        );
        for (key, value) in text_settings_from(std::env::vars_os())? {
            figment = figment.merge(Serialized::default(&key, value));
        }
        let source = match path {
            Some(path) => format!("{} and WANGGE_* variables", path.display()),
            None => "WANGGE_* variables".to_owned(),
        };
        Settings::from_figment(figment, &source)
    }

    /// The settings `figment` gives, validated; `source` names where they came from.
    fn from_figment(figment: Figment, source: &str) -> anyhow::Result<Settings> {
        let settings: Settings = figment.extract().map_err(|error| {
            explain(error, source).context(format!("read configuration from {source}"))
        })?;
        settings
            .validate()
            .with_context(|| format!("invalid settings (from {source})"))?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            cities().contains(&self.city.as_str()),
            "city {:?} has no built-in policy and standards; the cities are {}",
            self.city,
            cities().join(", ")
        );
        anyhow::ensure!(
            self.store.replicas == 1 || self.store.replicas == 3,
            "store.replicas must be 1 or 3, got {}",
            self.store.replicas
        );
        anyhow::ensure!(
            (1..=DUPLICATE_WINDOW_MAX_SECONDS).contains(&self.store.duplicate_window_seconds),
            "store.duplicate_window_seconds must be between 1 and {DUPLICATE_WINDOW_MAX_SECONDS} \
             (30 days, the age of SUBMISSIONS and NOTIFICATIONS messages), got {}",
            self.store.duplicate_window_seconds
        );
        anyhow::ensure!(
            !self.nats.url.trim().is_empty(),
            "nats.url must not be empty"
        );
        // The parse `connect` uses, so a URL refused there is refused here, before any work.
        crate::cmd::serve::server_addresses(&self.nats.url)?;
        for (key, file) in [
            ("policy.categories_file", &self.policy.categories_file),
            ("policy.routing_file", &self.policy.routing_file),
            ("policy.calendar_file", &self.policy.calendar_file),
            ("nats.credentials", &self.nats.credentials),
            ("nats.tls_ca_file", &self.nats.tls_ca_file),
            ("nats.tls_cert_file", &self.nats.tls_cert_file),
            ("nats.tls_key_file", &self.nats.tls_key_file),
        ] {
            if let Some(file) = file {
                anyhow::ensure!(
                    file.is_file(),
                    "{key} {} {}",
                    file.display(),
                    if file.exists() {
                        "is not a file"
                    } else {
                        "does not exist"
                    }
                );
            }
        }
        anyhow::ensure!(
            self.observe.metrics_address.is_empty()
                || self
                    .observe
                    .metrics_address
                    .parse::<std::net::SocketAddr>()
                    .is_ok(),
            "observe.metrics_address {:?} is not an address and port such as 0.0.0.0:9464 \
             (empty: no metrics endpoint)",
            self.observe.metrics_address
        );
        anyhow::ensure!(
            self.observe.micro_service,
            "observe.micro_service = false is not supported: every service's request subjects \
             are NATS micro-service endpoints, which answer $SRV.PING/INFO/STATS as well"
        );
        anyhow::ensure!(
            self.nats.user.is_some() == self.nats.password.is_some(),
            "nats.user and nats.password go together"
        );
        anyhow::ensure!(
            self.nats.tls_cert_file.is_some() == self.nats.tls_key_file.is_some(),
            "nats.tls_cert_file and nats.tls_key_file go together"
        );
        anyhow::ensure!(
            !self.nats.inbox_prefix.is_empty()
                && !self
                    .nats
                    .inbox_prefix
                    .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace()),
            "nats.inbox_prefix must be one subject token, got {:?}",
            self.nats.inbox_prefix
        );
        anyhow::ensure!(
            self.observe.lag_refresh_seconds >= 1,
            "observe.lag_refresh_seconds must be at least 1"
        );
        anyhow::ensure!(
            (1..=WORKER_THREADS_MAX).contains(&self.runtime.worker_threads),
            "runtime.worker_threads must be between 1 and {WORKER_THREADS_MAX}, got {}",
            self.runtime.worker_threads
        );
        self.intake.validate()?;
        self.dispatch.validate()?;
        self.projection.validate()
    }
}

impl Settings {
    /// The city's policy (taxonomy, routing, calendar): built in, with the files of
    /// `[policy]` in place of their parts. Warns when the calendar lists no holidays for
    /// the current year: deadlines would then count holidays as working days.
    pub fn policy(&self) -> anyhow::Result<domain::Policy> {
        let read =
            |key: &str, file: &Option<std::path::PathBuf>| -> anyhow::Result<Option<String>> {
                file.as_ref()
                    .map(|path| {
                        std::fs::read_to_string(path)
                            .with_context(|| format!("read {key} {}", path.display()))
                    })
                    .transpose()
            };
        let categories = read("policy.categories_file", &self.policy.categories_file)?;
        let routing = read("policy.routing_file", &self.policy.routing_file)?;
        let calendar = read("policy.calendar_file", &self.policy.calendar_file)?;
        let policy = domain::Policy::embedded_with(
            &self.city,
            categories.as_deref(),
            routing.as_deref(),
            calendar.as_deref(),
        )
        .with_context(|| {
            format!(
                "load the policy of city {:?} (with the files of [policy]: {:?})",
                self.city, self.policy
            )
        })?;
        let this_year = time::OffsetDateTime::now_utc().year();
        match policy.calendar.listed_through_year() {
            Some(last) if last >= this_year => {}
            last => tracing::warn!(
                city = %self.city,
                listed_through = ?last,
                this_year,
                "the business calendar lists no holidays for this year, so deadlines count them as working days; give the year's holidays and make-up days in policy.calendar_file"
            ),
        }
        Ok(policy)
    }
}

impl IntakeSettings {
    /// Refuses values outside their named bounds, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.dedup_radius_m.is_finite()
                && (0.0..=DEDUP_RADIUS_MAX_M).contains(&self.dedup_radius_m),
            "intake.dedup_radius_m (--dedup-radius-m) must be between 0 and {DEDUP_RADIUS_MAX_M} metres, got {}",
            self.dedup_radius_m
        );
        anyhow::ensure!(
            (0..=DEDUP_WINDOW_MAX_MINUTES).contains(&self.dedup_window_minutes),
            "intake.dedup_window_minutes (--dedup-window-minutes) must be between 0 and {DEDUP_WINDOW_MAX_MINUTES}, got {}",
            self.dedup_window_minutes
        );
        anyhow::ensure!(
            (1..=RATE_BURST_MAX).contains(&self.rate_burst),
            "intake.rate_burst (--rate-burst) must be between 1 and {RATE_BURST_MAX}, got {}",
            self.rate_burst
        );
        anyhow::ensure!(
            (1..=RATE_REFILL_MAX_SECONDS).contains(&self.rate_refill_seconds),
            "intake.rate_refill_seconds (--rate-refill-seconds) must be between 1 and {RATE_REFILL_MAX_SECONDS}, got {}",
            self.rate_refill_seconds
        );
        let fill_max = intake::BATCH_FILL_WAIT_MAX.as_millis() as u64;
        anyhow::ensure!(
            self.batch_fill_wait_ms <= fill_max,
            "intake.batch_fill_wait_ms (--batch-fill-wait-ms) must be at most {fill_max}, got {}",
            self.batch_fill_wait_ms
        );
        Ok(())
    }
}

impl DispatchSettings {
    /// Refuses values outside their named bounds, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let fill_max = dispatch::service::DELIVERIES_FILL_WAIT_MAX.as_millis() as u64;
        anyhow::ensure!(
            self.deliveries_fill_wait_ms <= fill_max,
            "dispatch.deliveries_fill_wait_ms (--deliveries-fill-wait-ms) must be at most {fill_max}, got {}",
            self.deliveries_fill_wait_ms
        );
        Ok(())
    }
}

/// Prints the effective settings as TOML, with the NATS password redacted.
pub fn print(settings: &Settings) -> anyhow::Result<()> {
    let mut shown = settings.clone();
    if shown.nats.password.is_some() {
        shown.nats.password = Some("<redacted>".to_owned());
    }
    let rendered = toml::to_string_pretty(&shown).context("render settings as TOML")?;
    let unset = unset_keys(&serde_json::to_value(&shown).context("render settings")?);
    print!("{}", note_unset_keys(&rendered, &unset));
    Ok(())
}

/// The keys whose value is not set (TOML has no null, so they would not show at all), by
/// section: `""` for the top level, `nats` for `[nats]`.
fn unset_keys(settings: &serde_json::Value) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut unset = std::collections::BTreeMap::<String, Vec<String>>::new();
    let Some(top) = settings.as_object() else {
        return unset;
    };
    for (key, value) in top {
        match value {
            serde_json::Value::Null => unset.entry(String::new()).or_default().push(key.clone()),
            serde_json::Value::Object(section) => {
                let keys: Vec<String> = section
                    .iter()
                    .filter(|(_, value)| value.is_null())
                    .map(|(key, _)| key.clone())
                    .collect();
                if !keys.is_empty() {
                    unset.insert(key.clone(), keys);
                }
            }
            _ => {}
        }
    }
    unset
}

/// `rendered` (TOML) with a comment line for each unset key at the end of its section, so
/// `wangge config` shows every key there is to set.
fn note_unset_keys(
    rendered: &str,
    unset: &std::collections::BTreeMap<String, Vec<String>>,
) -> String {
    let mut out = String::new();
    let mut section = String::new();
    let mut pending_blank_lines = 0;
    let close = |out: &mut String, section: &str| {
        for key in unset.get(section).into_iter().flatten() {
            out.push_str(&format!("# {key}: not set\n"));
        }
    };
    for line in rendered.lines() {
        if line.is_empty() {
            pending_blank_lines += 1;
            continue;
        }
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            close(&mut out, &section);
            section = name.to_owned();
        }
        for _ in 0..pending_blank_lines {
            out.push('\n');
        }
        pending_blank_lines = 0;
        out.push_str(line);
        out.push('\n');
    }
    close(&mut out, &section);
    out
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    /// Settings from built-in defaults and `toml` (as a file would give them), validated:
    /// the settings' `[intake]`, `[dispatch]`, `[runtime]` and `[projection]` sections, or
    /// the error.
    fn check(toml: &str, expect: Expect) {
        let loaded = Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(toml)),
            "the test's TOML",
        );
        let shown = match loaded {
            Ok(settings) => format!(
                "{:?}\n{:?}\n{:?}\n{:?}",
                settings.intake, settings.dispatch, settings.runtime, settings.projection
            ),
            Err(error) => format!("error: {error:#}"),
        };
        expect.assert_eq(&shown);
    }

    /// `wangge config` names the keys it cannot show a value for.
    #[test]
    fn unset_keys_are_named_in_their_section() {
        let mut settings = Settings::default();
        settings.nats.user = Some("intake".to_owned());
        settings.policy.routing_file = Some("routing.toml".into());
        let rendered = toml::to_string_pretty(&settings).expect("toml");
        let unset = unset_keys(&serde_json::to_value(&settings).expect("json"));
        let noted = note_unset_keys(&rendered, &unset);
        let sections = |text: &str| -> String {
            text.split("\n\n")
                .filter(|section| section.starts_with("[nats]") || section.starts_with("[policy]"))
                .collect::<Vec<_>>()
                .join("\n\n")
        };
        expect![[r#"
            [nats]
            url = "nats://127.0.0.1:4222"
            client_name = "wangge"
            user = "intake"
            inbox_prefix = "_INBOX"
            # credentials: not set
            # password: not set
            # tls_ca_file: not set
            # tls_cert_file: not set
            # tls_key_file: not set

            [policy]
            routing_file = "routing.toml"
            # calendar_file: not set
            # categories_file: not set
        "#]]
        .assert_eq(&sections(&noted));
        // Nothing else changes: without the comments, the text is what TOML rendered.
        let uncommented: String = noted
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(uncommented, rendered);
    }

    #[test]
    fn service_tuning_comes_from_the_file_within_named_bounds() {
        check(
            "",
            expect![[r#"
                IntakeSettings { dedup_radius_m: 50.0, dedup_window_minutes: 4320, rate_burst: 10, rate_refill_seconds: 360, batch_fill_wait_ms: 2 }
                DispatchSettings { deliveries_fill_wait_ms: 2 }
                RuntimeSettings { worker_threads: 1, transparent_huge_pages: false }
                ProjectionSettings { weight_response: 1.0, weight_resolution: 1.0, weight_satisfaction: 1.0 }"#]],
        );
        check(
            "[intake]\ndedup_radius_m = 0.0\nrate_burst = 50\nbatch_fill_wait_ms = 0\n[dispatch]\ndeliveries_fill_wait_ms = 5",
            expect![[r#"
                IntakeSettings { dedup_radius_m: 0.0, dedup_window_minutes: 4320, rate_burst: 50, rate_refill_seconds: 360, batch_fill_wait_ms: 0 }
                DispatchSettings { deliveries_fill_wait_ms: 5 }
                RuntimeSettings { worker_threads: 1, transparent_huge_pages: false }
                ProjectionSettings { weight_response: 1.0, weight_resolution: 1.0, weight_satisfaction: 1.0 }"#]],
        );
        check(
            "[intake]\nrate_burst = 0",
            expect![
                "error: invalid settings (from the test's TOML): intake.rate_burst (--rate-burst) must be between 1 and 10000, got 0"
            ],
        );
        check(
            "[intake]\ndedup_radius_m = 5000.0",
            expect![
                "error: invalid settings (from the test's TOML): intake.dedup_radius_m (--dedup-radius-m) must be between 0 and 1000 metres, got 5000"
            ],
        );
        check(
            "[intake]\ndedup_window_minutes = -1",
            expect![
                "error: invalid settings (from the test's TOML): intake.dedup_window_minutes (--dedup-window-minutes) must be between 0 and 43200, got -1"
            ],
        );
        check(
            "[intake]\nrate_refill_seconds = 0",
            expect![
                "error: invalid settings (from the test's TOML): intake.rate_refill_seconds (--rate-refill-seconds) must be between 1 and 86400, got 0"
            ],
        );
        check(
            "[intake]\nbatch_fill_wait_ms = 1001",
            expect![
                "error: invalid settings (from the test's TOML): intake.batch_fill_wait_ms (--batch-fill-wait-ms) must be at most 1000, got 1001"
            ],
        );
        check(
            "[dispatch]\ndeliveries_fill_wait_ms = 60000",
            expect![
                "error: invalid settings (from the test's TOML): dispatch.deliveries_fill_wait_ms (--deliveries-fill-wait-ms) must be at most 1000, got 60000"
            ],
        );
        check(
            "[runtime]\nworker_threads = 2",
            expect![[r#"
                IntakeSettings { dedup_radius_m: 50.0, dedup_window_minutes: 4320, rate_burst: 10, rate_refill_seconds: 360, batch_fill_wait_ms: 2 }
                DispatchSettings { deliveries_fill_wait_ms: 2 }
                RuntimeSettings { worker_threads: 2, transparent_huge_pages: false }
                ProjectionSettings { weight_response: 1.0, weight_resolution: 1.0, weight_satisfaction: 1.0 }"#]],
        );
        check(
            "[runtime]\nworker_threads = 0",
            expect![
                "error: invalid settings (from the test's TOML): runtime.worker_threads must be between 1 and 64, got 0"
            ],
        );
        check(
            "[projection]\nweight_response = 2.0\nweight_satisfaction = 0.5",
            expect![[r#"
                IntakeSettings { dedup_radius_m: 50.0, dedup_window_minutes: 4320, rate_burst: 10, rate_refill_seconds: 360, batch_fill_wait_ms: 2 }
                DispatchSettings { deliveries_fill_wait_ms: 2 }
                RuntimeSettings { worker_threads: 1, transparent_huge_pages: false }
                ProjectionSettings { weight_response: 2.0, weight_resolution: 1.0, weight_satisfaction: 0.5 }"#]],
        );
        check(
            "[projection]\nweight_resolution = -1.0",
            expect![
                "error: invalid settings (from the test's TOML): projection.weight_resolution (--weight-resolution) must be between 0 and 1000, got -1"
            ],
        );
        check(
            "[projection]\nweight_resolution = 1e9",
            expect![
                "error: invalid settings (from the test's TOML): projection.weight_resolution (--weight-resolution) must be between 0 and 1000, got 1000000000"
            ],
        );
        check(
            "[projection]\nweight_response = 0.0\nweight_resolution = 0.0\nweight_satisfaction = 0.0",
            expect![
                "error: invalid settings (from the test's TOML): at least one scorecard weight (projection.weight_response, weight_resolution, weight_satisfaction) must be positive"
            ],
        );
        check(
            "[intake]\nbatch_fill_wait = 3",
            expect![[
                r#"error: read configuration from the test's TOML: unknown setting "intake.batch_fill_wait" (from the test's TOML); the keys of [intake] are: dedup_radius_m, dedup_window_minutes, rate_burst, rate_refill_seconds, batch_fill_wait_ms"#
            ]],
        );
    }

    #[test]
    fn connection_settings_are_checked_before_any_work() {
        check(
            "[nats]\nurl = \"http://127.0.0.1:4222\"",
            expect![[
                r#"error: invalid settings (from the test's TOML): nats.url: "http://127.0.0.1:4222" is not a NATS server URL: invalid scheme for NATS server URL: http"#
            ]],
        );
        check(
            "[nats]\nurl = \"tls://a:4222, 127.0.0.1:4223\"",
            expect![[r#"
                IntakeSettings { dedup_radius_m: 50.0, dedup_window_minutes: 4320, rate_burst: 10, rate_refill_seconds: 360, batch_fill_wait_ms: 2 }
                DispatchSettings { deliveries_fill_wait_ms: 2 }
                RuntimeSettings { worker_threads: 1, transparent_huge_pages: false }
                ProjectionSettings { weight_response: 1.0, weight_resolution: 1.0, weight_satisfaction: 1.0 }"#]],
        );
        check(
            "[nats]\ntls_ca_file = \"/nonexistent/ca.pem\"",
            expect![
                "error: invalid settings (from the test's TOML): nats.tls_ca_file /nonexistent/ca.pem does not exist"
            ],
        );
        check(
            "[observe]\nmetrics_address = \"notanaddress\"",
            expect![[
                r#"error: invalid settings (from the test's TOML): observe.metrics_address "notanaddress" is not an address and port such as 0.0.0.0:9464 (empty: no metrics endpoint)"#
            ]],
        );
        check(
            "[store]\nduplicate_window_seconds = 99999999",
            expect![
                "error: invalid settings (from the test's TOML): store.duplicate_window_seconds must be between 1 and 2592000 (30 days, the age of SUBMISSIONS and NOTIFICATIONS messages), got 99999999"
            ],
        );
    }

    /// The commit format an upgrade holds back, and a word that is not one.
    #[test]
    fn the_commit_format_is_named_and_checked() {
        let load = |toml: &str| {
            Settings::from_figment(
                Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(toml)),
                "the test's TOML",
            )
            .map(|settings| format!("{:?}", settings.store.commit_format))
            .unwrap_or_else(|error| format!("error: {error:#}"))
        };
        let shown = [
            "",
            "[store]\ncommit_format = \"headers\"",
            "[store]\ncommit_format = \"body\"",
            "[store]\ncommit_format = \"sideways\"",
        ]
        .map(load);
        expect![[r#"
            Body
            Headers
            Body
            error: read configuration from the test's TOML: setting "store.commit_format" (from the test's TOML): unknown variant: found `sideways`, expected ``headers` or `body``"#]].assert_eq(&shown.join("\n"));
    }

    #[test]
    fn text_settings_from_the_environment_are_taken_verbatim() {
        let variables = [
            ("WANGGE_NATS__PASSWORD", "123456"),
            ("WANGGE_NATS__CLIENT_NAME", "007"),
            ("WANGGE_NATS__USER", "\"quoted\""),
            ("wangge_log__filter", "  info  "),
            ("WANGGE_STORE__REPLICAS", "3"),
            ("OTHER_NATS__PASSWORD", "x"),
        ]
        .map(|(name, value)| (name.into(), value.into()));
        let found = text_settings_from(variables.into_iter()).unwrap();
        expect![[r#"[("nats.password", "123456"), ("nats.client_name", "007"), ("nats.user", "\"quoted\""), ("log.filter", "  info  ")]"#]]
        .assert_eq(&format!("{found:?}"));
    }

    #[test]
    fn policy_files_replace_the_built_in_ones() {
        let folder = tempfile::tempdir().unwrap();
        let calendar = folder.path().join("calendar.toml");
        std::fs::write(
            &calendar,
            "utc_offset = \"+08:00\"\nworking_hours = [\"08:00-12:00\", \"14:30-17:30\"]\n\
             weekend = [\"sat\", \"sun\"]\nholidays = [\"2031-01-01\"]\n",
        )
        .unwrap();
        let mut settings = Settings::default();
        settings.policy.calendar_file = Some(calendar.clone());
        settings.validate().unwrap();
        let policy = settings.policy().unwrap();
        assert_eq!(policy.calendar.listed_through_year(), Some(2031));
        assert_eq!(policy.calendar.working_minutes_per_day(), 7 * 60);

        std::fs::write(&calendar, "utc_offset = \"+25:00\"").unwrap();
        let error = format!("{:#}", settings.policy().unwrap_err());
        assert!(
            error.contains("load the policy of city \"sanming\"") && error.contains("calendar"),
            "{error}"
        );
        settings.policy.calendar_file = Some(folder.path().join("missing.toml"));
        let error = format!("{:#}", settings.validate().unwrap_err());
        assert!(error.contains("policy.calendar_file"), "{error}");
    }
}
