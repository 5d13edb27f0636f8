//! Walks a whole stream and checks every aggregate's hash chain. Finds commits that were
//! edited (hash no longer matches content), forged (previous hash does not match), reordered
//! (versions out of order) or deleted (a gap in the stream's sequences, a chain that skips).
//!
//! WHY chain heads: the chain's hashes are plain SHA-256, so whoever can write the stream can
//! also rewrite a history and recompute every hash after the edit; the walk alone then finds
//! nothing (the newest commit of an aggregate, or a whole stream replaced, checks out). What
//! an auditor keeps outside the log closes that: the heads a walk saw ([`ChainHead`]: each
//! aggregate's newest version and hash), checked by a later walk. Each head's hash covers its
//! aggregate's whole history up to it, so any change at or before a saved head shows. Hashes
//! do not cover the stream sequence, so a copied stream could also take commits slipped in
//! among the old ones; but a log only appended to since the heads were saved has every commit
//! they do not cover after all of them, so one standing before a saved head is a finding
//! ([`Finding::AddedBeforeSavedHeads`]).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::codec::EventCodec;
use crate::envelope::{CommitFormat, Position, decode_raw, events_header_mismatch};
use crate::error::LoadError;
use crate::store::EventStore;

/// Longest wait for one message during a verification walk.
const VERIFY_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most findings kept in a report; the count goes on beyond it.
const FINDINGS_MAX: usize = 10_000;
/// Most aggregates one walk follows. A walk keeps each aggregate's newest position in memory
/// (about 150 bytes with its key), and the heads it saves must fit in a heads file that
/// `wangge audit verify --check-heads` reads back (1 GiB, about 6 million heads); past the bound
/// the walk stops with an error instead of growing until the operating system kills it.
pub const VERIFY_AGGREGATES_MAX: usize = 6_000_000;

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
    /// In a format-1 commit, the `Wangge-Events` header does not describe the body (not covered by the hash, it was
    /// edited: tools that route or audit by it would be misled).
    EventsHeaderMismatch {
        sequence: u64,
        aggregate: String,
        detail: String,
    },
    /// The commit does not follow the previous commit of its aggregate.
    BrokenLink {
        sequence: u64,
        aggregate: String,
        detail: String,
    },
    /// The aggregate's history up to a saved chain head is not what it was when the head was
    /// saved: the commit that ends at the saved version has another hash, or no commit ends
    /// there any more.
    HeadChanged {
        sequence: u64,
        aggregate: String,
        version: u64,
        detail: String,
    },
    /// The aggregate no longer reaches the version of its saved chain head (commits at the
    /// end of its history, or the whole aggregate, are gone).
    HeadMissing {
        aggregate: String,
        version: u64,
        /// The newest version found (0: none).
        found_version: u64,
    },
    /// A commit the saved heads do not cover (an aggregate they do not name, or a version
    /// past its saved head) stands before a saved head in stream order. In a log that was
    /// only appended to since the heads were saved, every such commit comes after all of
    /// them: this one was put in among the old commits (a copied stream, rewritten).
    AddedBeforeSavedHeads {
        sequence: u64,
        aggregate: String,
        version: u64,
        /// Saved heads not yet met at this commit.
        heads_not_yet_met: u64,
    },
}

/// One aggregate's newest commit as a walk saw it. Saved outside the log, a set of heads lets
/// a later walk prove the history up to each head unchanged (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub aggregate: String,
    pub version: u64,
    /// The stream sequence of the commit (informative: a copied stream renumbers).
    pub sequence: u64,
    /// The commit's chain hash, SHA-256 in lower-case hex.
    pub hash: String,
}

/// Saved chain heads by aggregate, with their hashes decoded, to check a walk against.
#[derive(Debug, Clone, Default)]
pub struct SavedHeads {
    heads: HashMap<String, (u64, [u8; 32])>,
}

impl SavedHeads {
    /// Checks every head's hash; refuses a head named twice.
    pub fn new(heads: impl IntoIterator<Item = ChainHead>) -> Result<SavedHeads, String> {
        let mut saved = HashMap::new();
        for head in heads {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&head.hash, &mut hash).map_err(|error| {
                format!(
                    "chain head of {}: hash {:?} is not 64 hex digits: {error}",
                    head.aggregate, head.hash
                )
            })?;
            if head.version == 0 {
                return Err(format!("chain head of {}: version 0", head.aggregate));
            }
            if saved
                .insert(head.aggregate.clone(), (head.version, hash))
                .is_some()
            {
                return Err(format!("chain head of {} is listed twice", head.aggregate));
            }
        }
        Ok(SavedHeads { heads: saved })
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub stream: String,
    pub commits_checked: u64,
    pub aggregates: u64,
    pub last_sequence: u64,
    pub findings: Vec<Finding>,
    pub findings_total: u64,
    /// How many saved chain heads the walk was checked against (absent: none given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_heads_checked: Option<u64>,
    /// Every aggregate's newest commit as this walk saw it, by aggregate (for saving).
    #[serde(skip)]
    pub heads: Vec<ChainHead>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.findings_total == 0
    }

    fn add(&mut self, finding: Finding) {
        self.findings_total += 1;
        if self.findings.len() < FINDINGS_MAX {
            self.findings.push(finding);
        }
    }
}

/// Commits the saved heads do not cover, met while some saved head was still ahead. They are
/// findings only once a saved head is met after them: a head that never comes (its commit
/// lost, a restore from an older backup) is reported as `HeadMissing`, and every commit
/// appended since must not be accused of having been slipped in.
#[derive(Debug, Default)]
struct UncoveredBeforeHeads {
    /// Saved heads not met yet.
    unmet: std::collections::HashSet<String>,
    /// Held findings (at most [`FINDINGS_MAX`]), and how many more were met.
    held: Vec<Finding>,
    held_beyond: u64,
}

impl UncoveredBeforeHeads {
    fn hold(&mut self, finding: Finding) {
        if self.held.len() < FINDINGS_MAX {
            self.held.push(finding);
        } else {
            self.held_beyond += 1;
        }
    }

    /// A saved head was met: everything held stood before it.
    fn head_met(&mut self, aggregate: &str, report: &mut VerifyReport) {
        if self.unmet.remove(aggregate) {
            for finding in self.held.drain(..) {
                report.add(finding);
            }
            report.findings_total += std::mem::take(&mut self.held_beyond);
        }
    }
}

impl<C: EventCodec> EventStore<C> {
    /// Checks every commit in the stream. `progress` is called every 10,000 commits with
    /// (checked, last sequence).
    pub async fn verify(&self, progress: impl FnMut(u64, u64)) -> Result<VerifyReport, LoadError> {
        self.verify_against(&SavedHeads::default(), progress).await
    }

    /// [`EventStore::verify`], and also checks that the history up to each of `saved` (chain
    /// heads a walk saved earlier) is unchanged.
    pub async fn verify_against(
        &self,
        saved: &SavedHeads,
        progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, LoadError> {
        self.verify_within(saved, VERIFY_AGGREGATES_MAX, progress)
            .await
    }

    /// [`EventStore::verify_against`], following at most `aggregates_max` aggregates (a walk
    /// that meets more stops with an error: nothing is concluded).
    pub async fn verify_within(
        &self,
        saved: &SavedHeads,
        aggregates_max: usize,
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
            saved_heads_checked: (!saved.is_empty()).then_some(saved.len() as u64),
            heads: Vec::new(),
        };
        if info.state.messages == 0 {
            // Every sequence up to the last is gone. (A purge leaves first = last + 1: the
            // range starts at 1, not at the first sequence.)
            if last_sequence > 0 {
                report.add(Finding::MissingSequences {
                    from: 1,
                    to: last_sequence,
                });
            }
            check_heads_reached(&mut report, &HashMap::new(), saved);
            return Ok(report);
        }
        if first_sequence > 1 {
            report.add(Finding::MissingSequences {
                from: 1,
                to: first_sequence - 1,
            });
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
        // The walk ends on what the server says, never on a silence. Every delivered message
        // carries how many are left for the consumer (`pending`): 0 means nothing follows, so
        // sequences up to `last_sequence` not seen by then were deleted, and a message past
        // `last_sequence` (appended since the walk began) means the same for the ones before
        // it. A silence (no message within VERIFY_MESSAGE_TIMEOUT) proves nothing by itself:
        // reporting it as missing sequences accused the log of a deletion a slow server had
        // not made. So after one the stream leader is asked for the first message at or after
        // the next sequence: none means the rest is gone (a finding; this is how a message
        // dropped from a damaged block file at the tail shows, which the server still counts
        // in `messages` and in `pending`), one within the walk means the consumer stalled (an
        // error: nothing is concluded).
        //
        // Not used: the stream info's list of deleted sequences (`info_builder()
        // .with_deleted(true)`). It is one unbounded reply, repeats what the walk's sequence
        // gaps and `pending` establish, and does not name a message lost from a damaged block
        // (the tampering test in crates/wangge/tests/audit_cli.rs: `messages` 4, nothing
        // listed as deleted, sequence 4 not found).
        let mut chains: HashMap<String, Position> = HashMap::new();
        // Saved heads the walk has not met yet; a commit they do not cover, met before one of
        // them, is out of place (see `Finding::AddedBeforeSavedHeads`).
        let mut uncovered = UncoveredBeforeHeads {
            unmet: saved.heads.keys().cloned().collect(),
            ..UncoveredBeforeHeads::default()
        };
        let mut previous_sequence = first_sequence - 1;
        while previous_sequence < last_sequence {
            let message = match tokio::time::timeout(VERIFY_MESSAGE_TIMEOUT, messages.next()).await
            {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => return Err(read_error(error.to_string())),
                Ok(None) => {
                    return Err(read_error(format!(
                        "the message stream ended after sequence {previous_sequence} of \
                         {last_sequence}; nothing is concluded about the rest"
                    )));
                }
                Err(_) => match self.first_stored_from(previous_sequence + 1).await {
                    Ok(Some(stored)) if stored <= last_sequence => {
                        return Err(read_error(format!(
                            "no message within {VERIFY_MESSAGE_TIMEOUT:?} after sequence \
                             {previous_sequence} of {last_sequence} although the server holds \
                             sequence {stored}; nothing is concluded about the rest"
                        )));
                    }
                    // Nothing stored from here to the walk's end: reported below.
                    Ok(_) => break,
                    Err(reason) => {
                        return Err(read_error(format!(
                            "no message within {VERIFY_MESSAGE_TIMEOUT:?} after sequence \
                             {previous_sequence} of {last_sequence}, and asking the server what \
                             follows failed: {reason}"
                        )));
                    }
                },
            };
            let info = message
                .info()
                .map_err(|error| read_error(error.to_string()))?;
            let sequence = info.stream_sequence;
            if sequence > last_sequence {
                break;
            }
            let nothing_follows = info.pending == 0;
            if sequence > previous_sequence + 1 {
                report.add(Finding::MissingSequences {
                    from: previous_sequence + 1,
                    to: sequence - 1,
                });
            }
            previous_sequence = sequence;
            report.commits_checked += 1;
            if report.commits_checked.is_multiple_of(10_000) {
                progress(report.commits_checked, last_sequence);
            }
            check_commit(
                &mut report,
                &mut chains,
                saved,
                &mut uncovered,
                sequence,
                &message,
            );
            if chains.len() > aggregates_max {
                return Err(read_error(format!(
                    "more than {aggregates_max} aggregates by stream sequence {sequence} of \
                     {last_sequence}: a walk keeps every aggregate's chain head in memory, and \
                     this one would outgrow its bound; nothing is concluded"
                )));
            }
            if nothing_follows {
                break;
            }
        }
        if previous_sequence < last_sequence {
            report.add(Finding::MissingSequences {
                from: previous_sequence + 1,
                to: last_sequence,
            });
        }
        report.aggregates = chains.len() as u64;
        check_heads_reached(&mut report, &chains, saved);
        let mut heads: Vec<ChainHead> = chains
            .into_iter()
            .map(|(aggregate, position)| ChainHead {
                aggregate,
                version: position.version,
                sequence: position.sequence,
                hash: hex::encode(position.hash),
            })
            .collect();
        heads.sort_unstable_by(|left, right| left.aggregate.cmp(&right.aggregate));
        report.heads = heads;
        progress(report.commits_checked, last_sequence);
        Ok(report)
    }
}

/// Reports every saved head whose aggregate the walk did not follow up to the saved version.
/// (A head the walk did reach was compared where its commit was met, in [`check_commit`].)
fn check_heads_reached(
    report: &mut VerifyReport,
    chains: &HashMap<String, Position>,
    saved: &SavedHeads,
) {
    let mut missing: Vec<(&String, u64, u64)> = saved
        .heads
        .iter()
        .filter_map(|(aggregate, (version, _))| {
            let found_version = chains.get(aggregate).map_or(0, |position| position.version);
            (found_version < *version).then_some((aggregate, *version, found_version))
        })
        .collect();
    missing.sort_unstable();
    for (aggregate, version, found_version) in missing {
        report.add(Finding::HeadMissing {
            aggregate: aggregate.clone(),
            version,
            found_version,
        });
    }
}

/// Checks one commit's envelope, body, content hash and link to its aggregate's previous
/// commit, adding what is wrong to `report`.
fn check_commit(
    report: &mut VerifyReport,
    chains: &mut HashMap<String, Position>,
    saved: &SavedHeads,
    uncovered: &mut UncoveredBeforeHeads,
    sequence: u64,
    message: &async_nats::jetstream::Message,
) {
    let subject = message.subject.to_string();
    let headers = message.headers.clone().unwrap_or_default();
    // As `load` reads it: a body whose event count disagrees with its versions (a format-2
    // envelope states both versions) cannot be loaded, so it is reported here too.
    let (envelope, events, body) = match decode_raw(&subject, &headers, &message.payload) {
        Ok(decoded) => decoded,
        Err(error) => {
            report.add(Finding::Undecodable {
                sequence,
                subject,
                reason: error.to_string(),
            });
            return;
        }
    };
    let aggregate = envelope.aggregate.clone();
    if envelope.recomputed_hash(events) != envelope.hash {
        report.add(Finding::HashMismatch {
            sequence,
            aggregate: aggregate.clone(),
        });
    }
    // A format-2 commit lists its events once, in the body the hash covers.
    if let Some(detail) = (envelope.format == CommitFormat::Headers)
        .then(|| events_header_mismatch(&headers, &body))
        .flatten()
    {
        report.add(Finding::EventsHeaderMismatch {
            sequence,
            aggregate: aggregate.clone(),
            detail,
        });
    }
    let previous = chains.entry(aggregate.clone()).or_insert(Position::NEW);
    if envelope.first_version != previous.version + 1 {
        let detail = format!(
            "version {} follows version {}",
            envelope.first_version, previous.version
        );
        report.add(Finding::BrokenLink {
            sequence,
            aggregate: aggregate.clone(),
            detail,
        });
    } else if envelope.previous_hash != previous.hash {
        let detail = "previous hash does not match the preceding commit".to_owned();
        report.add(Finding::BrokenLink {
            sequence,
            aggregate: aggregate.clone(),
            detail,
        });
    }
    let covered = saved
        .heads
        .get(&aggregate)
        .is_some_and(|(saved_version, _)| envelope.first_version <= *saved_version);
    if !covered && !uncovered.unmet.is_empty() {
        uncovered.hold(Finding::AddedBeforeSavedHeads {
            sequence,
            aggregate: aggregate.clone(),
            version: envelope.version,
            heads_not_yet_met: uncovered.unmet.len() as u64,
        });
    }
    if let Some((saved_version, saved_hash)) = saved.heads.get(&aggregate)
        && (envelope.first_version..=envelope.version).contains(saved_version)
    {
        uncovered.head_met(&aggregate, report);
        let detail = if envelope.version != *saved_version {
            Some(format!(
                "the saved head is version {saved_version}; this commit holds versions {} to {}",
                envelope.first_version, envelope.version
            ))
        } else if envelope.hash != *saved_hash {
            Some(format!(
                "the commit of version {saved_version} has hash {}, the saved head {}",
                hex::encode(envelope.hash),
                hex::encode(saved_hash)
            ))
        } else {
            None
        };
        if let Some(detail) = detail {
            report.add(Finding::HeadChanged {
                sequence,
                aggregate: aggregate.clone(),
                version: *saved_version,
                detail,
            });
        }
    }
    *previous = Position {
        version: envelope.version,
        sequence,
        hash: envelope.hash,
    };
}

#[cfg(test)]
mod tests {
    use super::{ChainHead, SavedHeads};

    fn head(aggregate: &str, version: u64, hash: &str) -> ChainHead {
        ChainHead {
            aggregate: aggregate.to_owned(),
            version,
            sequence: 1,
            hash: hash.to_owned(),
        }
    }

    fn check(heads: Vec<ChainHead>) -> String {
        match SavedHeads::new(heads) {
            Ok(saved) => format!("ok: {} heads", saved.len()),
            Err(reason) => reason,
        }
    }

    #[test]
    fn saved_heads_are_checked_when_read() {
        let good = "ab".repeat(32);
        expect_test::expect!["ok: 2 heads"].assert_eq(&check(vec![
            head("incident-a", 3, &good),
            head("incident-b", 1, &good),
        ]));
        expect_test::expect![[
            r#"chain head of incident-a: hash "abc" is not 64 hex digits: Odd number of digits"#
        ]]
        .assert_eq(&check(vec![head("incident-a", 3, "abc")]));
        expect_test::expect!["chain head of incident-a: version 0"].assert_eq(&check(vec![head(
            "incident-a",
            0,
            &good,
        )]));
        expect_test::expect!["chain head of incident-a is listed twice"].assert_eq(&check(vec![
            head("incident-a", 3, &good),
            head("incident-a", 4, &good),
        ]));
    }
}
