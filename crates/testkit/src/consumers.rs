//! Faults on the consumer side, made with the server's own API: a paused consumer delivers
//! nothing, exactly like a follower that lags the stream, without touching the service.

use std::time::Duration;

use futures::TryStreamExt as _;

/// How long [`pause_follower`] pauses: longer than any test that uses it.
const FOLLOWER_PAUSE: Duration = Duration::from_secs(600);

/// Pauses the consumer of `stream` whose name starts with `name_prefix` (a service
/// instance's private follower is named `<instance>-<uuid>`). Panics when there is none.
pub async fn pause_follower(client: &async_nats::Client, stream: &str, name_prefix: &str) {
    let jetstream = async_nats::jetstream::new(client.clone());
    let stream = jetstream
        .get_stream(stream)
        .await
        .unwrap_or_else(|error| panic!("open stream {stream}: {error}"));
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .expect("list consumer names");
    let follower = names
        .iter()
        .find(|name| name.starts_with(name_prefix))
        .unwrap_or_else(|| panic!("no consumer named {name_prefix}… among {names:?}"));
    let until = async_nats::datetime::add_std_duration(async_nats::datetime::now(), FOLLOWER_PAUSE)
        .expect("a time ahead");
    stream
        .pause_consumer(follower, until)
        .await
        .unwrap_or_else(|error| panic!("pause consumer {follower}: {error}"));
}
