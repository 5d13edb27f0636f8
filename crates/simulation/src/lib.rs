//! simulation: a city on the bus — seeded communities registered with the registry, resident
//! apps submitting reports, department consoles and grid workers answering notifications.
//!
//! WHY a library and not part of the demo command: `wangge demo`, `wangge bench pipeline` and
//! the end-to-end crash test must drive the same city the same way, and only a library can be
//! shared by a binary and an integration test. Everything goes through the public NATS
//! contracts (JSON requests, JetStream submissions, notification subjects) exactly as a real
//! app or console would, so the simulation also exercises those contracts. Randomness is a
//! seeded SplitMix64 (from `partition::synthetic`), so the same seed gives the same city, the
//! same reports and the same console behaviours.
#![forbid(unsafe_code)]

pub mod city;
pub mod consoles;
pub mod residents;

use std::time::Duration;

pub use city::{CityPlan, PlannedCommunity, RegisteredGrid, plan_city, register_city};
pub use consoles::{Behaviour, ConsolePlan, ConsoleStats, Consoles};
pub use residents::{ResidentPlan, ResidentStats, Residents};

/// Longest wait for one request's reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request before the simulation gives up (services may be restarting).
pub const REQUEST_ATTEMPTS_MAX: u32 = 30;
/// Pause between two attempts.
pub const REQUEST_RETRY_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum SimulationError {
    #[error("request {subject}: no answer after {attempts} attempts: {reason}")]
    NoAnswer {
        subject: String,
        attempts: u32,
        reason: String,
    },
    #[error("request {subject}: refused: {reply}")]
    Refused { subject: String, reply: String },
    #[error("{context}: {reason}")]
    Bus { context: String, reason: String },
}

/// Sends `body` to `subject` and returns the JSON reply, retrying (bounded) while no service
/// answers. Every request the simulation sends is idempotent (it carries a command or
/// submission id), so a retry never applies anything twice.
pub async fn request_json(
    client: &async_nats::Client,
    subject: &str,
    body: &impl serde::Serialize,
) -> Result<serde_json::Value, SimulationError> {
    let payload =
        bytes::Bytes::from(
            serde_json::to_vec(body).map_err(|error| SimulationError::Bus {
                context: format!("encode request to {subject}"),
                reason: error.to_string(),
            })?,
        );
    let mut last_error = String::new();
    for _ in 0..REQUEST_ATTEMPTS_MAX {
        let request = client.request(subject.to_owned(), payload.clone());
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(message)) => {
                let reply: serde_json::Value =
                    serde_json::from_slice(&message.payload).map_err(|error| {
                        SimulationError::Bus {
                            context: format!("decode reply from {subject}"),
                            reason: error.to_string(),
                        }
                    })?;
                // `error` is "could not store, try again" in every service's contract.
                if reply["status"] == "error" {
                    last_error = reply.to_string();
                } else {
                    return Ok(reply);
                }
            }
            Ok(Err(error)) => last_error = error.to_string(),
            Err(_) => last_error = format!("no reply within {REQUEST_TIMEOUT:?}"),
        }
        tokio::time::sleep(REQUEST_RETRY_PAUSE).await;
    }
    Err(SimulationError::NoAnswer {
        subject: subject.to_owned(),
        attempts: REQUEST_ATTEMPTS_MAX,
        reason: last_error,
    })
}
