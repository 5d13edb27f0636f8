//! Set-up shared by the projection's service tests.
#![allow(dead_code)]

use std::time::Duration;

use eventstore::{BoundedContext, StreamSpec};
use projection::{LeaseTiming, Progress, ProjectionConfig, ProjectionService};
use tokio::sync::watch;

/// Longest wait for anything a test waits on.
pub const WAIT_MAX: Duration = Duration::from_secs(30);
/// Builder lease of the test instances: short, so a takeover (or a restart after an abort)
/// happens within a test.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

pub fn specs() -> (StreamSpec, StreamSpec) {
    (
        StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120)),
        StreamSpec::for_context(BoundedContext::Grids, 1, Duration::from_secs(120)),
    )
}

/// A client of `url`, its JetStream context and the INCIDENTS store (created).
pub async fn incidents_store(
    url: &str,
) -> (
    async_nats::Client,
    async_nats::jetstream::Context,
    eventstore::EventStore<codecs::IncidentCodec>,
) {
    let client = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let (incidents_spec, _) = specs();
    let store =
        eventstore::EventStore::open(jetstream.clone(), incidents_spec, codecs::IncidentCodec)
            .await
            .unwrap();
    (client, jetstream, store)
}

pub struct Running {
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), projection::ServiceError>>,
    pub progress: watch::Receiver<Progress>,
}

/// Starts a projection instance named `instance` (small flushes, short ack wait and lease).
pub async fn start(url: &str, instance: &str) -> Running {
    start_with_ttl(url, instance, LEASE_TTL).await
}

/// [`start`] with a builder lease of `lease_ttl`.
pub async fn start_with_ttl(url: &str, instance: &str, lease_ttl: Duration) -> Running {
    let client = async_nats::connect(url).await.unwrap();
    let (incidents, grids) = specs();
    let mut config = ProjectionConfig::new(incidents, grids);
    config.instance = instance.to_owned();
    config.flush_commits_max = 64;
    // A department of the city with no case (its board is empty, not unknown).
    config.departments = vec!["quiet".to_owned()];
    config.ack_wait = Duration::from_secs(1);
    config.lease = LeaseTiming::from_ttl(lease_ttl);
    let service = ProjectionService::start(client, config).await.unwrap();
    let progress = service.progress();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(service.run(stopped));
    Running {
        stop,
        task,
        progress,
    }
}
