//! Walks a whole stream and checks every aggregate's hash chain. Finds commits that were
//! edited (hash no longer matches content), forged (previous hash does not match), reordered
//! (versions out of order) or deleted (a gap in the stream's sequences, a chain that skips).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt as _;
use serde::Serialize;

use crate::codec::EventCodec;
use crate::envelope::{Position, decode_body, decode_envelope};
use crate::error::LoadError;
use crate::store::EventStore;

/// Longest wait for one message during a verification walk.
const VERIFY_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most findings kept in a report; the count goes on beyond it.
const FINDINGS_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Stream sequences `from..=to` are gone (deleted or purged).
    MissingSequences { from: u64, to: u64 },
    /// The message is not a well-formed commit.
    Undecodable {
        sequence: u64,
        subject: String,
        reason: String,
    },
    /// The stored hash does not match the commit's content: it was edited.
    HashMismatch { sequence: u64, aggregate: String },
    /// The commit does not follow the previous commit of its aggregate.
    BrokenLink {
        sequence: u64,
        aggregate: String,
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub stream: String,
    pub commits_checked: u64,
    pub aggregates: u64,
    pub last_sequence: u64,
    pub findings: Vec<Finding>,
    pub findings_total: u64,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.findings_total == 0
    }
}

impl<C: EventCodec> EventStore<C> {
    /// Checks every commit in the stream. `progress` is called every 10,000 commits with
    /// (checked, last sequence).
    pub async fn verify(
        &self,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, LoadError> {
        let stream_name = self.spec.stream_name.clone();
        let read_error = |reason: String| LoadError::Read {
            subject: self.spec.all_subjects(),
            reason,
        };
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let (first_sequence, last_sequence) = (info.state.first_sequence, info.state.last_sequence);
        let mut report = VerifyReport {
            stream: stream_name,
            commits_checked: 0,
            aggregates: 0,
            last_sequence,
            findings: Vec::new(),
            findings_total: 0,
        };
        let add = |report: &mut VerifyReport, finding: Finding| {
            report.findings_total += 1;
            if report.findings.len() < FINDINGS_MAX {
                report.findings.push(finding);
            }
        };
        if first_sequence > 1 && last_sequence > 0 {
            add(
                &mut report,
                Finding::MissingSequences {
                    from: 1,
                    to: first_sequence - 1,
                },
            );
        }
        if info.state.messages == 0 {
            if last_sequence > 0 {
                add(
                    &mut report,
                    Finding::MissingSequences {
                        from: first_sequence.max(1),
                        to: last_sequence,
                    },
                );
            }
            return Ok(report);
        }
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.spec.all_subjects(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let mut chains: HashMap<String, Position> = HashMap::new();
        let mut previous_sequence = first_sequence.saturating_sub(1);
        while previous_sequence < last_sequence {
            let next = tokio::time::timeout(VERIFY_MESSAGE_TIMEOUT, messages.next()).await;
            let message = match next {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => return Err(read_error(error.to_string())),
                // Nothing more although the stream's last sequence is further: the tail is gone.
                Ok(None) | Err(_) => break,
            };
            let info = message
                .info()
                .map_err(|error| read_error(error.to_string()))?;
            let sequence = info.stream_sequence;
            if sequence > previous_sequence + 1 {
                add(
                    &mut report,
                    Finding::MissingSequences {
                        from: previous_sequence + 1,
                        to: sequence - 1,
                    },
                );
            }
            previous_sequence = sequence;
            report.commits_checked += 1;
            if report.commits_checked.is_multiple_of(10_000) {
                progress(report.commits_checked, last_sequence);
            }
            let subject = message.subject.to_string();
            let headers = message.headers.clone().unwrap_or_default();
            let envelope = match decode_envelope(&subject, &headers) {
                Ok(envelope) => envelope,
                Err(error) => {
                    add(
                        &mut report,
                        Finding::Undecodable {
                            sequence,
                            subject,
                            reason: error.to_string(),
                        },
                    );
                    continue;
                }
            };
            if let Err(error) = decode_body(envelope.body_format, &message.payload) {
                add(
                    &mut report,
                    Finding::Undecodable {
                        sequence,
                        subject,
                        reason: error.to_string(),
                    },
                );
                continue;
            }
            let aggregate = envelope.aggregate.clone();
            if envelope.recomputed_hash(&message.payload) != envelope.hash {
                add(
                    &mut report,
                    Finding::HashMismatch {
                        sequence,
                        aggregate: aggregate.clone(),
                    },
                );
            }
            let previous = chains.entry(aggregate.clone()).or_insert(Position::NEW);
            if envelope.first_version != previous.version + 1 {
                let detail = format!(
                    "version {} follows version {}",
                    envelope.first_version, previous.version
                );
                add(
                    &mut report,
                    Finding::BrokenLink {
                        sequence,
                        aggregate: aggregate.clone(),
                        detail,
                    },
                );
            } else if envelope.previous_hash != previous.hash {
                let detail = "previous hash does not match the preceding commit".to_owned();
                add(
                    &mut report,
                    Finding::BrokenLink {
                        sequence,
                        aggregate: aggregate.clone(),
                        detail,
                    },
                );
            }
            *previous = Position {
                version: envelope.version,
                sequence,
                hash: envelope.hash,
            };
        }
        if previous_sequence < last_sequence {
            add(
                &mut report,
                Finding::MissingSequences {
                    from: previous_sequence + 1,
                    to: last_sequence,
                },
            );
        }
        report.aggregates = chains.len() as u64;
        progress(report.commits_checked, last_sequence);
        Ok(report)
    }
}
