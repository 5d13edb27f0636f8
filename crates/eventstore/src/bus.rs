//! A round trip to the server, for when "subscribed" must mean "the server knows".
//!
//! `async_nats::Client::flush` resolves once this process has written its buffer to the socket,
//! not when the server has read it. A service that announces "ready" after subscribing and
//! flushing can still lose a race against a request sent on another connection (the server
//! answers that request "no responders"). The server reads one connection's input in order, so
//! any reply to a later request proves the earlier SUBs are registered.

use std::time::Duration;

/// How long the barrier waits for the server's answer.
pub const SERVER_BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("round trip to the NATS server: {reason}")]
pub struct BarrierError {
    reason: String,
}

/// Returns once the server has processed everything this client sent before the call.
pub async fn server_barrier(client: &async_nats::Client) -> Result<(), BarrierError> {
    // A fresh inbox nobody listens on: the server answers "no responders" at once.
    let probe = client.new_inbox();
    let request = async_nats::Request::new().timeout(Some(SERVER_BARRIER_TIMEOUT));
    match client.send_request(probe, request).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(error) => Err(BarrierError {
            reason: error.to_string(),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("subscribe to {subject}: {reason}")]
pub struct SubscribeReadyError {
    pub subject: String,
    pub reason: String,
}

/// Subscribes to each subject in the queue group, then waits for [`server_barrier`]: when
/// this returns, a request sent on any connection finds these subscribers.
pub async fn queue_subscribe_ready(
    client: &async_nats::Client,
    subjects: &[&str],
    queue_group: &str,
) -> Result<Vec<async_nats::Subscriber>, SubscribeReadyError> {
    let mut subscribers = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let subscriber = client
            .queue_subscribe(subject.to_string(), queue_group.to_owned())
            .await
            .map_err(|error| SubscribeReadyError {
                subject: (*subject).to_owned(),
                reason: error.to_string(),
            })?;
        subscribers.push(subscriber);
    }
    server_barrier(client)
        .await
        .map_err(|error| SubscribeReadyError {
            subject: "server barrier".to_owned(),
            reason: error.to_string(),
        })?;
    Ok(subscribers)
}
