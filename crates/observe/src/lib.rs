//! Operational signals shared by every wangge service: Prometheus metrics, an HTTP health
//! check, NATS micro-service registration and the ids that tie log lines to an incident.
//!
//! Why one crate: a city's engineers watch all services the same way. Every service exposes
//! the same metric names (with `service` and `instance` labels), the same `/healthz`, and
//! answers `$SRV.PING`/`$SRV.INFO`/`$SRV.STATS` with the standard NATS micro schema, so
//! `nats micro ls` and one Prometheus scrape config cover the whole system. The services only
//! count; this crate owns the registry, the HTTP endpoint and the lag poller.
//!
//! - [`Observer`]: a cheap handle (clone it into tasks) holding the [`Metrics`] and the
//!   health state. [`Observer::disabled`] is a private registry nobody serves, for tests and
//!   in-process helpers.
//! - [`serve_http`]: `GET /metrics` (OpenMetrics text), `GET /healthz` (readiness: 200 when
//!   the NATS connection is up and the service has finished its start-up, else 503) and
//!   `GET /livez` (liveness: 200 while the process answers, whatever the bus), on hyper.
//! - [`spawn_lag_refresh`]: reads each stream's last sequence every few seconds; the lag of a
//!   stream is that minus the sequence the service reports having folded in.
//! - [`micro_service`]: registers the service under `wangge-<service>` in the service's
//!   queue group; the services take their requests from its endpoints, so the endpoints'
//!   request counts, errors and processing times are real.
//! - [`trace_id`]: the trace id of a W3C `traceparent`, for log spans.
//! - [`refusal`]: the codes every service refuses an unreadable request with.
#![forbid(unsafe_code)]

pub mod refusal;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Content type of the OpenMetrics text format that `/metrics` serves.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Version reported by every micro service (the crate version of the binary).
pub const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Prefix of every micro service name: `wangge-registry`, `wangge-intake`, ...
pub const SERVICE_NAME_PREFIX: &str = "wangge-";
/// Longest time one HTTP connection may stay open (a scrape is one short request).
const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP connections served at once; more wait in the listen backlog.
const HTTP_CONNECTIONS_MAX: usize = 64;
/// Longest wait for a request's headers on a connection: a client that connects and sends
/// nothing (or dribbles) frees its place after this, so idle connections cannot hold every
/// place and starve the probes for `HTTP_CONNECTION_TIMEOUT`.
const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest lag poll interval accepted (a larger one would make the lag gauge useless).
pub const LAG_REFRESH_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("metrics address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("listen for metrics on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("register NATS micro service {name}: {reason}")]
    Micro { name: String, reason: String },
    #[error("add NATS micro endpoint {subject}: {reason}")]
    Endpoint { subject: String, reason: String },
    #[error("wait for the server to register the endpoints of {name}: {reason}")]
    Barrier { name: String, reason: String },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The micro endpoint (`commands`, `locate`, ...).
    pub endpoint: String,
    /// `accepted`, `rejected` (a business refusal) or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Every metric a wangge service may report. All live in one registry with the constant
/// labels `service` and `instance`, under the prefix `wangge_`. Counters are meant for
/// `rate()`; a counter a service does not use stays at zero.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `wangge_requests_total{endpoint,outcome}`: requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// `wangge_request_seconds{endpoint,outcome}`: time from receipt to answer.
    pub request_seconds: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// `wangge_commits_appended_total`: commits this instance appended to an event stream.
    pub commits_appended: Counter,
    /// `wangge_append_conflicts_total`: appends lost to another writer (then re-read).
    pub append_conflicts: Counter,
    /// `wangge_commits_folded_total`: commits folded into the in-memory state.
    pub commits_folded: Counter,
    /// `wangge_stream_reached_sequence{stream}`: last stream sequence folded in.
    pub reached_sequence: Family<StreamLabels, Gauge>,
    /// `wangge_stream_last_sequence{stream}`: the stream's end, polled.
    pub stream_last_sequence: Family<StreamLabels, Gauge>,
    /// `wangge_stream_lag_messages{stream}`: stream end minus reached sequence.
    pub stream_lag: Family<StreamLabels, Gauge>,
    /// `wangge_deadlines_pending`: deadlines this instance holds and will fire.
    pub deadlines_pending: Gauge,
    /// `wangge_deadlines_escalated_total`: missed deadlines this instance recorded.
    pub deadlines_escalated: Counter,
    /// `wangge_whistles_blown_total{kind}`: whistles in commits this instance appended
    /// (`routine`, `tough`, `emergency`); summed over instances, each whistle counts once.
    pub whistles_blown: Family<KindLabels, Counter>,
    /// `wangge_incidents_held`: incidents held in memory.
    pub incidents_held: Gauge,
    /// `wangge_dispatched_total`: filed incidents this instance routed.
    pub dispatched: Counter,
    /// `wangge_notifications_total`: notifications published.
    pub notifications: Counter,
    /// `wangge_submissions_total{kind}`: intake receipts by status (`filed`, `merged`,
    /// `rejected`).
    pub submissions: Family<KindLabels, Counter>,
}

fn request_histogram() -> Histogram {
    // 0.1 ms .. ~3 s.
    Histogram::new(exponential_buckets(0.000_1, 3.0, 10))
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            commits_appended: Counter::default(),
            append_conflicts: Counter::default(),
            commits_folded: Counter::default(),
            reached_sequence: Family::default(),
            stream_last_sequence: Family::default(),
            stream_lag: Family::default(),
            deadlines_pending: Gauge::default(),
            deadlines_escalated: Counter::default(),
            whistles_blown: Family::default(),
            incidents_held: Gauge::default(),
            dispatched: Counter::default(),
            notifications: Counter::default(),
            submissions: Family::default(),
        }
    }
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("requests", "Requests answered", self.requests.clone());
        registry.register(
            "request_seconds",
            "Time from receipt to answer",
            self.request_seconds.clone(),
        );
        registry.register(
            "commits_appended",
            "Commits this instance appended to an event stream",
            self.commits_appended.clone(),
        );
        registry.register(
            "append_conflicts",
            "Appends lost to another writer",
            self.append_conflicts.clone(),
        );
        registry.register(
            "commits_folded",
            "Commits folded into the in-memory state",
            self.commits_folded.clone(),
        );
        registry.register(
            "stream_reached_sequence",
            "Last stream sequence folded in",
            self.reached_sequence.clone(),
        );
        registry.register(
            "stream_last_sequence",
            "Last sequence of the stream (polled)",
            self.stream_last_sequence.clone(),
        );
        registry.register(
            "stream_lag_messages",
            "Stream end minus the sequence folded in",
            self.stream_lag.clone(),
        );
        registry.register(
            "deadlines_pending",
            "Deadlines held by this instance",
            self.deadlines_pending.clone(),
        );
        registry.register(
            "deadlines_escalated",
            "Missed deadlines recorded by this instance",
            self.deadlines_escalated.clone(),
        );
        registry.register(
            "whistles_blown",
            "Whistles in commits this instance appended",
            self.whistles_blown.clone(),
        );
        registry.register(
            "incidents_held",
            "Incidents held in memory",
            self.incidents_held.clone(),
        );
        registry.register(
            "dispatched",
            "Filed incidents routed by this instance",
            self.dispatched.clone(),
        );
        registry.register(
            "notifications",
            "Notifications published",
            self.notifications.clone(),
        );
        registry.register(
            "submissions",
            "Intake receipts by status",
            self.submissions.clone(),
        );
    }

    /// Counts one answered request and its duration.
    pub fn request(&self, endpoint: &str, outcome: &str, elapsed: Duration) {
        let labels = RequestLabels {
            endpoint: endpoint.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Records the last sequence of `stream` folded in (and the lag, if the end is known).
    pub fn reached(&self, stream: &str, sequence: u64) {
        let labels = StreamLabels {
            stream: stream.to_owned(),
        };
        let reached = i64::try_from(sequence).unwrap_or(i64::MAX);
        self.reached_sequence.get_or_create(&labels).set(reached);
        // The lag is unknown until the stream's end has been polled: exported then, not as a
        // reassuring 0 before.
        let Some(last) = self
            .stream_last_sequence
            .get(&labels)
            .map(|gauge| gauge.get())
        else {
            return;
        };
        self.stream_lag
            .get_or_create(&labels)
            .set(last.saturating_sub(reached).max(0));
    }

    fn stream_end(&self, stream: &str, last: u64) {
        let labels = StreamLabels {
            stream: stream.to_owned(),
        };
        let last = i64::try_from(last).unwrap_or(i64::MAX);
        self.stream_last_sequence.get_or_create(&labels).set(last);
        let reached = self.reached_sequence.get_or_create(&labels).get();
        self.stream_lag
            .get_or_create(&labels)
            .set(last.saturating_sub(reached).max(0));
    }

    /// Exports each of `kinds` at 0 from the start, so that an alert on the first increase
    /// (`increase(...[10m]) > 0`) fires on the first whistle after a restart too.
    pub fn declare_whistle_kinds(&self, kinds: &[&str]) {
        for kind in kinds {
            let _created = self.whistles_blown.get_or_create(&KindLabels {
                kind: (*kind).to_owned(),
            });
        }
    }

    /// As [`Self::declare_whistle_kinds`], for intake's receipts.
    pub fn declare_submission_kinds(&self, kinds: &[&str]) {
        for kind in kinds {
            let _created = self.submissions.get_or_create(&KindLabels {
                kind: (*kind).to_owned(),
            });
        }
    }

    pub fn whistle(&self, kind: &str) {
        self.whistles_blown
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn submission(&self, kind: &str) {
        self.submissions
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }
}

#[derive(Debug)]
struct Inner {
    service: String,
    instance: String,
    registry: Registry,
    metrics: Metrics,
    started: AtomicBool,
    stopping: AtomicBool,
    client: std::sync::Mutex<Option<async_nats::Client>>,
}

/// A service's metrics and health, shared by its tasks.
#[derive(Debug, Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

/// Why `/healthz` says no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unhealthy {
    Starting,
    Stopping,
    Disconnected(String),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::Starting => f.write_str("starting: catching up with its streams"),
            Unhealthy::Stopping => f.write_str("stopping"),
            Unhealthy::Disconnected(state) => write!(f, "NATS connection {state}"),
        }
    }
}

impl Observer {
    /// A new registry for `service` (`registry`, `intake`, `dispatch`, ...) and `instance`.
    pub fn new(service: &str, instance: &str) -> Observer {
        let labels = [
            (Cow::Borrowed("service"), Cow::Owned(service.to_owned())),
            (Cow::Borrowed("instance"), Cow::Owned(instance.to_owned())),
        ];
        let mut registry = Registry::with_prefix_and_labels("wangge", labels.into_iter());
        let metrics = Metrics::default();
        metrics.register(&mut registry);
        Observer {
            inner: Arc::new(Inner {
                service: service.to_owned(),
                instance: instance.to_owned(),
                registry,
                metrics,
                started: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                client: std::sync::Mutex::new(None),
            }),
        }
    }

    /// An observer nobody serves (tests, in-process helpers): counting still works.
    pub fn disabled() -> Observer {
        Observer::new("unobserved", "unobserved")
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The connection `/healthz` checks.
    pub fn watch_connection(&self, client: &async_nats::Client) {
        if let Ok(mut slot) = self.inner.client.lock() {
            *slot = Some(client.clone());
        }
    }

    /// The service finished its start-up (caught up, subscribed): healthy from now on while
    /// the connection is up.
    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the service is started, not stopping, and its NATS connection is up.
    pub fn health(&self) -> Result<(), Unhealthy> {
        if self.inner.stopping.load(Ordering::Relaxed) {
            return Err(Unhealthy::Stopping);
        }
        if !self.inner.started.load(Ordering::Relaxed) {
            return Err(Unhealthy::Starting);
        }
        let state = self
            .inner
            .client
            .lock()
            .ok()
            .and_then(|client| client.as_ref().map(async_nats::Client::connection_state));
        match state {
            None | Some(async_nats::connection::State::Connected) => Ok(()),
            Some(other) => Err(Unhealthy::Disconnected(other.to_string())),
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            warn!(%error, "encode metrics");
        }
        text
    }
}

/// A running HTTP endpoint for metrics and health.
#[derive(Debug)]
pub struct HttpEndpoint {
    /// The address actually bound (useful with port 0).
    pub address: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves `GET /metrics` and `GET /healthz` on `address` until `shutdown` turns true.
pub async fn serve_http(
    address: &str,
    observer: Observer,
    mut shutdown: watch::Receiver<bool>,
) -> Result<HttpEndpoint, ObserveError> {
    let socket: SocketAddr = address.parse().map_err(|error| ObserveError::Address {
        address: address.to_owned(),
        reason: format!("{error}"),
    })?;
    let listener = tokio::net::TcpListener::bind(socket)
        .await
        .map_err(|source| ObserveError::Listen {
            address: address.to_owned(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ObserveError::Listen {
            address: address.to_owned(),
            source,
        })?;
    info!(address = %bound, "metrics and health on http://{bound}/metrics and /healthz");
    let permits = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "accept metrics connection");
                    continue;
                }
            };
            // Waiting for a place, still listening for the shutdown.
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            let observer = observer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let observer = observer.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&observer, &request)) }
                });
                // One request per connection (a scrape or a probe), its headers read within
                // HTTP_HEADER_READ_TIMEOUT.
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HTTP_HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                match tokio::time::timeout(HTTP_CONNECTION_TIMEOUT, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => debug!(%peer, %error, "metrics connection"),
                    Err(_) => debug!(%peer, "metrics connection timed out"),
                }
                drop(permit);
            });
        }
    });
    Ok(HttpEndpoint {
        address: bound,
        task,
    })
}

fn answer<B>(observer: &Observer, request: &hyper::Request<B>) -> hyper::Response<String> {
    let response = |status: u16, content_type: &str, body: String| {
        let mut response = hyper::Response::new(body);
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != hyper::Method::GET {
        return response(405, "text/plain", "only GET\n".to_owned());
    }
    match request.uri().path() {
        "/metrics" => response(200, METRICS_CONTENT_TYPE, observer.encode()),
        "/healthz" | "/readyz" => match observer.health() {
            Ok(()) => response(200, "text/plain", "ok\n".to_owned()),
            Err(why) => response(503, "text/plain", format!("{why}\n")),
        },
        // Liveness, for a supervisor deciding whether to restart the process: this answer
        // comes from the service's own runtime, so a wedged loop on a one-thread runtime
        // stops it, but a NATS outage does not (the client reconnects by itself; restarting
        // every service because the bus is away would only add a cold start to the outage).
        "/livez" => response(200, "text/plain", "alive\n".to_owned()),
        _ => response(
            404,
            "text/plain",
            "/metrics, /healthz (ready: started and connected) or /livez (alive)\n".to_owned(),
        ),
    }
}

/// Polls each stream's last sequence every `every` and updates the lag gauges, until
/// `shutdown` turns true. A failed poll keeps the previous figures (and logs at debug).
pub fn spawn_lag_refresh(
    jetstream: async_nats::jetstream::Context,
    streams: Vec<String>,
    every: Duration,
    observer: Observer,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let every = every.clamp(Duration::from_millis(100), LAG_REFRESH_MAX);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                _ = ticks.tick() => {
                    for name in &streams {
                        match jetstream.get_stream(name).await {
                            Ok(mut stream) => match stream.info().await {
                                Ok(info) => observer.metrics().stream_end(name, info.state.last_sequence),
                                Err(error) => debug!(stream = %name, %error, "stream info for lag"),
                            },
                            Err(error) => debug!(stream = %name, %error, "open stream for lag"),
                        }
                    }
                }
            }
        }
    })
}

/// Registers `wangge-<service>` as a NATS micro service whose endpoints share
/// `queue_group`. Endpoints: [`endpoint`].
pub async fn micro_service(
    client: &async_nats::Client,
    service: &str,
    description: &str,
    queue_group: &str,
    instance: &str,
) -> Result<async_nats::service::Service, ObserveError> {
    use async_nats::service::ServiceExt as _;
    let name = format!("{SERVICE_NAME_PREFIX}{service}");
    client
        .service_builder()
        .description(description)
        .queue_group(queue_group)
        .metadata(
            [("instance".to_owned(), instance.to_owned())]
                .into_iter()
                .collect(),
        )
        .start(&name, SERVICE_VERSION)
        .await
        .map_err(|error| ObserveError::Micro {
            name,
            reason: error.to_string(),
        })
}

/// Adds an endpoint named `name` on `subject` (wildcards allowed) to `service`.
pub async fn endpoint(
    service: &async_nats::service::Service,
    name: &str,
    subject: &str,
) -> Result<async_nats::service::endpoint::Endpoint, ObserveError> {
    service
        .endpoint_builder()
        .name(name)
        .add(subject)
        .await
        .map_err(|error| ObserveError::Endpoint {
            subject: subject.to_owned(),
            reason: error.to_string(),
        })
}

/// Registers the micro service `wangge-<service>` with one endpoint per `(name, subject)`
/// and returns once the server has processed every subscription, so that a request sent after
/// this returns reaches this instance (or another member of its queue group).
pub async fn start_micro(
    client: &async_nats::Client,
    service: &str,
    description: &str,
    queue_group: &str,
    instance: &str,
    endpoints: &[(&str, &str)],
) -> Result<
    (
        async_nats::service::Service,
        Vec<async_nats::service::endpoint::Endpoint>,
    ),
    ObserveError,
> {
    let micro = micro_service(client, service, description, queue_group, instance).await?;
    let mut added = Vec::with_capacity(endpoints.len());
    for (name, subject) in endpoints {
        added.push(endpoint(&micro, name, subject).await?);
    }
    eventstore::bus::server_barrier(client)
        .await
        .map_err(|error| ObserveError::Barrier {
            name: format!("{SERVICE_NAME_PREFIX}{service}"),
            reason: error.to_string(),
        })?;
    Ok((micro, added))
}

/// The trace id (32 hex digits) of a well-formed W3C `traceparent`
/// (`<version>-<trace id>-<parent id>-<flags>`), `None` for anything else. Well formed, as
/// W3C Trace Context says: lower-case hex throughout; version two digits, not `ff`; trace id
/// 32 digits and parent id 16, neither all zeros; flags two digits; version 00 exactly
/// those 55 characters, a later version at least those and then only `-` and more. A value
/// that is not is replaced, never passed on into a commit's headers.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    fn lower_hex(field: &str, len: usize) -> bool {
        field.len() == len
            && field
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let head = traceparent.get(..55)?;
    let rest = &traceparent[55..];
    let mut parts = head.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && lower_hex(version, 2)
        && version != "ff"
        && lower_hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && lower_hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && lower_hex(flags, 2)
        && if version == "00" {
            rest.is_empty()
        } else {
            rest.is_empty() || rest.starts_with('-')
        }
        && traceparent.len() <= TRACEPARENT_BYTES_MAX;
    well_formed.then_some(trace)
}

/// Longest `traceparent` passed on (a later version may append fields; nothing sane is
/// longer): a header no limit on a message's body counts must not carry kilobytes into a
/// commit.
pub const TRACEPARENT_BYTES_MAX: usize = 256;

/// A W3C `traceparent` for work that starts here (no caller sent one): version 00, a random
/// trace id and span id, flags `00` (not sampled).
///
/// wangge records no spans of its own, so a trace it starts is not a sampling decision; the
/// id is there to tie log lines and commits together. It also keeps nats-server's message
/// tracing out of the way: for every published message whose `traceparent` says "sampled",
/// the server builds a map of all its headers to look for a trace destination (about 5% of
/// the server's time per filing in docs/BENCHMARKS.md, session 13), and traces the message
/// if the account has one. A caller's own `traceparent` is passed on as it came.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-00", &span[..16])
}

/// The caller's `traceparent` header if it is well formed, else a new one.
pub fn traceparent_or_new(headers: Option<&async_nats::HeaderMap>) -> String {
    headers
        .and_then(|headers| headers.get("traceparent"))
        .map(|value| value.as_str())
        .filter(|value| trace_id(value).is_some())
        .map_or_else(new_traceparent, str::to_owned)
}

#[cfg(test)]
mod tests;
