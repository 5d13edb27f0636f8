//! The stored form of a commit: an envelope (in the body since format 2, in NATS headers
//! before), a postcard body for the events, and the hash chain that links each commit to
//! the one before it.

use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::aggregate::AggregateId;
use crate::codec::{CodecError, EncodedEvent, EventCodec};
use crate::{COMMIT_BODY_BYTES_MAX, COMMIT_EVENTS_MAX};

/// Header names of the commit envelope.
pub mod headers {
    /// `<aggregate>/<command id>`: JetStream's idempotency key, stored with the message. The
    /// aggregate is also the subject's tail (`<context>.ev.<aggregate>`), which is
    /// authoritative; the two must agree.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The aggregate version of the commit's last event (gap-free from 1); the first event's
    /// version is this minus the number of events plus one.
    pub const VERSION: &str = "Wangge-Version";
    /// One `type/schema_version/event_id` per event, comma-separated, in order.
    pub const EVENTS: &str = "Wangge-Events";
    pub const CORRELATION_ID: &str = "Wangge-Correlation-Id";
    pub const CAUSATION_ID: &str = "Wangge-Causation-Id";
    pub const ACTOR: &str = "Wangge-Actor";
    /// When the decision was made: UTC milliseconds since the Unix epoch.
    pub const OCCURRED_AT: &str = "Wangge-Occurred-At";
    /// `previous_hash:hash`, both SHA-256 in hex.
    pub const CHAIN: &str = "Wangge-Chain";
    /// Body format; absent means 1.
    pub const BODY_FORMAT: &str = "Wangge-Body-Format";
    pub const TRACEPARENT: &str = "traceparent";
}

/// Header names, parsed once: async-nats hashes and copies a name on every insert.
static HEADER_NAMES: std::sync::LazyLock<[async_nats::header::HeaderName; 8]> =
    std::sync::LazyLock::new(|| {
        [
            headers::VERSION,
            headers::EVENTS,
            headers::CORRELATION_ID,
            headers::CAUSATION_ID,
            headers::ACTOR,
            headers::OCCURRED_AT,
            headers::CHAIN,
            headers::TRACEPARENT,
        ]
        .map(|name| name.parse().expect("header names are valid"))
    });

/// The body format this build writes. Older formats stay readable in [`decode_body`].
pub const BODY_FORMAT_CURRENT: u16 = 1;
// Format 1 is written without a `Wangge-Body-Format` header; a later format must write one.
const _: () = assert!(
    BODY_FORMAT_CURRENT == 1,
    "write Wangge-Body-Format for formats after 1"
);

/// Where a commit keeps its envelope (version, chain, ids, actor, time, events list). Both
/// are read, whatever a build writes; [`EventStore::with_commit_format`] chooses what it
/// writes.
///
/// Why the body: async-nats parses every header of every delivered message into a map of
/// owned strings. With the envelope in nine headers a pull consumer read 65–85k commits/s at
/// 12–16 µs of client CPU each; with the same bytes in the body, 160–220k/s at 3–4 µs, and a
/// publish cost 7–8 µs instead of 12–15 (docs/BENCHMARKS.md, "Session 24"). Every commit is
/// read back by several consumers (dispatch, its notifier, the projection, intake's
/// follower), so that parse was paid several times per commit.
///
/// [`EventStore::with_commit_format`]: crate::EventStore::with_commit_format
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitFormat {
    /// Format 1: the envelope in `Wangge-*` headers (every build before session 24).
    Headers,
    /// Format 2: the body is [`BODY_MAGIC`], the postcard envelope, then the events exactly
    /// as format 1 stores them; the only headers are the ones JetStream acts on
    /// (`Nats-Msg-Id`, `Nats-Expected-Last-Subject-Sequence`).
    #[default]
    Body,
}

/// Room reserved for a format-2 envelope: the fixed fields, an actor of 256 bytes and a
/// traceparent, with their length prefixes.
const BODY_ENVELOPE_BYTES_MAX: usize = 2 * 10 + 2 * 16 + 3 + 256 + 10 + 2 * 32 + 1 + 1 + 64;

/// First bytes of a format-2 commit body. A message on a stream's subjects with neither this
/// nor a `Wangge-Version` header is not a commit.
pub const BODY_MAGIC: &[u8; 4] = b"WGC\x02";
/// What every body-envelope format starts with, whatever its version byte: a commit of a
/// later format (`WGC\x03`, ...) is a commit this build cannot read, never a foreign message
/// to skip (see "Stored bytes decode forever" in ARCHITECTURE.md).
const BODY_MAGIC_PREFIX: &[u8; 3] = b"WGC";

/// The envelope of a format-2 commit, stored (postcard) between [`BODY_MAGIC`] and the
/// events. Frozen: a change is a new format.
#[derive(Debug, Serialize, Deserialize)]
struct BodyEnvelopeV2 {
    first_version: u64,
    version: u64,
    correlation_id: [u8; 16],
    causation_id: [u8; 16],
    actor: String,
    occurred_at_ms: i64,
    previous_hash: [u8; 32],
    hash: [u8; 32],
    traceparent: Option<String>,
}

/// The correlation and causation id of the commit a command writes, derived from the
/// command id (SHA-256 of `wangge/<writer>/command/v1`, a zero byte and the id, as a UUID
/// v8): a console can compute the id of what its command caused, a resent command gets the
/// same one, and a system command (whose id names the incident and the deadline or version
/// that caused it) is as traceable as a console's. Random ids linked nothing to anything.
pub fn command_uuid(writer: &str, command_id: &str) -> uuid::Uuid {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(b"wangge/")
        .chain_update(writer.as_bytes())
        .chain_update(b"/command/v1\0")
        .chain_update(command_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Where an aggregate stands: the version of its last event (gap-free, from 1), the stream
/// sequence of its last commit (for `Nats-Expected-Last-Subject-Sequence`), and that commit's
/// hash (the next commit's previous hash). A new aggregate is [`Position::NEW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub version: u64,
    pub sequence: u64,
    pub hash: [u8; 32],
}

impl Position {
    pub const NEW: Position = Position {
        version: 0,
        sequence: 0,
        hash: [0; 32],
    };

    pub fn is_new(&self) -> bool {
        self.version == 0
    }
}

/// Who did it, why, and when: the part of the envelope the caller supplies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMeta {
    /// Ties together everything one outside request caused (e.g. a resident's submission).
    pub correlation_id: Uuid,
    /// The message or event that directly caused this commit.
    pub causation_id: Uuid,
    /// Who acted, e.g. `department:urban-management/console-3` or `system:dispatch`.
    pub actor: String,
    /// When the decision was made, in UTC milliseconds (the `now` given to the domain).
    pub occurred_at_ms: i64,
    /// W3C trace context; when absent, one is derived from the correlation id (trace id) and
    /// the first event id (span id), not sampled (see `observe::new_traceparent` for why).
    pub traceparent: Option<String>,
}

/// Events one command produced, to be appended atomically. `command_id` is the idempotency
/// key: the same command id on the same aggregate is stored at most once.
#[derive(Debug, Clone)]
pub struct Commit<E> {
    pub command_id: String,
    pub events: Vec<E>,
    pub event_ids: Vec<Uuid>,
    pub meta: CommitMeta,
}

impl<E> Commit<E> {
    /// A commit with fresh UUID v7 event ids. Retrying the same `Commit` value reuses them.
    pub fn new(command_id: impl Into<String>, events: Vec<E>, meta: CommitMeta) -> Commit<E> {
        let event_ids = events.iter().map(|_| Uuid::now_v7()).collect();
        Commit {
            command_id: command_id.into(),
            events,
            event_ids,
            meta,
        }
    }
}

/// One stored event with its place in the aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent<E> {
    pub event_id: Uuid,
    pub version: u64,
    pub event_type: String,
    pub event: E,
}

/// A commit as read back from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCommit<E> {
    pub aggregate: AggregateId,
    pub command_id: String,
    pub sequence: u64,
    pub first_version: u64,
    pub version: u64,
    pub events: Vec<RecordedEvent<E>>,
    pub meta: CommitMeta,
    pub previous_hash: [u8; 32],
    pub hash: [u8; 32],
    /// When the server stored it, UTC milliseconds.
    pub stored_at_ms: i64,
}

impl<E> RecordedCommit<E> {
    pub fn position(&self) -> Position {
        Position {
            version: self.version,
            sequence: self.sequence,
            hash: self.hash,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredEventV1 {
    event_id: [u8; 16],
    event_type: String,
    schema_version: u16,
    payload: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CommitBodyV1 {
    events: Vec<StoredEventV1>,
}

pub(crate) struct ChainFields<'a> {
    pub aggregate: &'a str,
    pub command_id: &'a str,
    pub first_version: u64,
    pub version: u64,
    pub previous_hash: [u8; 32],
    pub meta: &'a CommitMeta,
    pub body: &'a [u8],
}

/// The chain hash: SHA-256 over a domain separator, every envelope field that matters
/// (length-prefixed strings, little-endian integers) and the body, in one pass. Frozen:
/// changing it breaks every stored chain.
pub(crate) fn chain_hash(fields: &ChainFields<'_>) -> [u8; 32] {
    fn string(prefix: &mut Vec<u8>, value: &str) {
        prefix.extend_from_slice(&(value.len() as u64).to_le_bytes());
        prefix.extend_from_slice(value.as_bytes());
    }
    const DOMAIN: &str = "wangge-commit-v1";
    // Everything before the body is gathered first and fed to the hasher in one call: the
    // digest is the same as field-by-field updates, with a fraction of the per-call overhead.
    let mut prefix = Vec::with_capacity(
        DOMAIN.len()
            + fields.aggregate.len()
            + fields.command_id.len()
            + fields.meta.actor.len()
            + CHAIN_FIXED_BYTES,
    );
    string(&mut prefix, DOMAIN);
    string(&mut prefix, fields.aggregate);
    string(&mut prefix, fields.command_id);
    prefix.extend_from_slice(&fields.first_version.to_le_bytes());
    prefix.extend_from_slice(&fields.version.to_le_bytes());
    prefix.extend_from_slice(&fields.previous_hash);
    prefix.extend_from_slice(fields.meta.correlation_id.as_bytes());
    prefix.extend_from_slice(fields.meta.causation_id.as_bytes());
    string(&mut prefix, &fields.meta.actor);
    prefix.extend_from_slice(&fields.meta.occurred_at_ms.to_le_bytes());
    prefix.extend_from_slice(&(fields.body.len() as u64).to_le_bytes());
    // ring's SHA-256 uses the CPU's vector (and SHA) instructions; measured 2x fewer
    // instructions than a portable implementation on CPUs without SHA-NI.
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    hasher.update(&prefix);
    hasher.update(fields.body);
    hasher
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 digests are 32 bytes")
}

/// Bytes of the chain hash input before the body that do not depend on string lengths: four
/// length prefixes, two versions, the previous hash, two UUIDs, the time and the body length.
const CHAIN_FIXED_BYTES: usize = 4 * 8 + 2 * 8 + 32 + 2 * 16 + 8 + 8;

/// Digest of what the events say (types, schema versions, payloads), without ids or times:
/// two commits under one command id are "the same" exactly when these match.
pub(crate) fn content_digest<'a>(
    events: impl Iterator<Item = (&'a str, u16, &'a [u8])>,
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for (event_type, schema_version, payload) in events {
        hasher.update((event_type.len() as u64).to_le_bytes());
        hasher.update(event_type.as_bytes());
        hasher.update(schema_version.to_le_bytes());
        hasher.update((payload.len() as u64).to_le_bytes());
        hasher.update(payload);
    }
    hasher.finalize().into()
}

/// A commit ready to publish.
pub(crate) struct OutgoingCommit {
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    pub msg_id: String,
    pub position_after: (u64, [u8; 32]),
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeCommitError {
    #[error("a commit needs at least one event")]
    Empty,
    #[error("commit has {count} events, more than {COMMIT_EVENTS_MAX}")]
    TooManyEvents { count: usize },
    #[error("commit body is {bytes} bytes, more than {COMMIT_BODY_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("commit has {events} events but {ids} event ids")]
    IdsMismatch { events: usize, ids: usize },
    #[error("{field} {value:?} cannot travel in a NATS header")]
    BadHeaderValue { field: &'static str, value: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Event types name events in the `Wangge-Events` header: `[a-z0-9._-]`, 1 to 64 bytes.
fn is_header_token(value: &str) -> bool {
    (1..=64).contains(&value.len())
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Free text in a header: printable, no control characters, no leading or trailing white
/// space, at most 256 bytes. NATS clients trim header values when they read them (async-nats
/// does), so a value with white space at either end (a typed "c1 ", a full-width space) would
/// read back other than the bytes its commit's hash covered: the intact commit would look
/// edited to `verify` and `load`. The command id travels in `Nats-Msg-Id` in both formats;
/// event types and the actor only in format 1, but both formats accept the same commits, so
/// a city holding format 1 back during an upgrade refuses nothing format 2 would take.
fn is_header_text(value: &str) -> bool {
    value.len() <= 256 && !value.chars().any(char::is_control) && value.trim() == value
}

pub(crate) fn encode_commit<C: EventCodec>(
    codec: &C,
    aggregate: &AggregateId,
    expected: &Position,
    commit: &Commit<C::Event>,
    format: CommitFormat,
) -> Result<OutgoingCommit, EncodeCommitError> {
    let count = commit.events.len();
    if count == 0 {
        return Err(EncodeCommitError::Empty);
    }
    if count > COMMIT_EVENTS_MAX {
        return Err(EncodeCommitError::TooManyEvents { count });
    }
    if commit.event_ids.len() != count {
        return Err(EncodeCommitError::IdsMismatch {
            events: count,
            ids: commit.event_ids.len(),
        });
    }
    let encoded: Vec<EncodedEvent> = commit
        .events
        .iter()
        .map(|event| codec.encode(event))
        .collect::<Result<_, _>>()?;

    if let Some(bad) = encoded.iter().find(|e| !is_header_token(&e.event_type)) {
        return Err(EncodeCommitError::BadHeaderValue {
            field: "event type",
            value: bad.event_type.clone(),
        });
    }
    for (field, value) in [
        ("actor", commit.meta.actor.as_str()),
        ("command id", commit.command_id.as_str()),
    ] {
        if !is_header_text(value) {
            return Err(EncodeCommitError::BadHeaderValue {
                field,
                value: value.to_owned(),
            });
        }
    }
    let events_header = (format == CommitFormat::Headers).then(|| {
        describe_events(
            encoded
                .iter()
                .zip(&commit.event_ids)
                .map(|(event, id)| (event.event_type.as_str(), event.schema_version, *id)),
        )
    });
    let mut uuid_text = Uuid::encode_buffer();
    let body_bytes_estimate = encoded
        .iter()
        .map(|event| event.payload.len() + event.event_type.len() + 32)
        .sum::<usize>()
        + 8;
    let body = CommitBodyV1 {
        events: encoded
            .into_iter()
            .zip(&commit.event_ids)
            .map(|(event, id)| StoredEventV1 {
                event_id: *id.as_bytes(),
                event_type: event.event_type,
                schema_version: event.schema_version,
                payload: event.payload,
            })
            .collect(),
    };
    let body =
        postcard::to_extend(&body, Vec::with_capacity(body_bytes_estimate)).map_err(|error| {
            EncodeCommitError::Codec(CodecError::Encode {
                event_type: "commit body".to_owned(),
                reason: error.to_string(),
            })
        })?;
    if body.len() > COMMIT_BODY_BYTES_MAX {
        return Err(EncodeCommitError::TooLarge { bytes: body.len() });
    }
    let first_version = expected.version + 1;
    let version = expected.version + count as u64;
    let hash = chain_hash(&ChainFields {
        aggregate: aggregate.as_str(),
        command_id: &commit.command_id,
        first_version,
        version,
        previous_hash: expected.hash,
        meta: &commit.meta,
        body: &body,
    });
    let meta = &commit.meta;
    let traceparent = match &meta.traceparent {
        Some(traceparent) => traceparent.clone(),
        None => {
            let span = commit.event_ids[0].as_bytes();
            let mut span_hex = [0u8; 16];
            hex_into(&span[8..16], &mut span_hex);
            let mut traceparent = String::with_capacity(55);
            traceparent.push_str("00-");
            traceparent.push_str(meta.correlation_id.simple().encode_lower(&mut uuid_text));
            traceparent.push('-');
            traceparent.push_str(std::str::from_utf8(&span_hex).unwrap_or_default());
            traceparent.push_str("-00");
            traceparent
        }
    };
    let mut msg_id = String::with_capacity(aggregate.as_str().len() + 1 + commit.command_id.len());
    msg_id.push_str(aggregate.as_str());
    msg_id.push('/');
    msg_id.push_str(&commit.command_id);
    let Some(events_header) = events_header else {
        let envelope = BodyEnvelopeV2 {
            first_version,
            version,
            correlation_id: *meta.correlation_id.as_bytes(),
            causation_id: *meta.causation_id.as_bytes(),
            actor: meta.actor.clone(),
            occurred_at_ms: meta.occurred_at_ms,
            previous_hash: expected.hash,
            hash,
            traceparent: Some(traceparent),
        };
        let mut stored =
            Vec::with_capacity(BODY_MAGIC.len() + BODY_ENVELOPE_BYTES_MAX + body.len());
        stored.extend_from_slice(BODY_MAGIC);
        let mut stored = postcard::to_extend(&envelope, stored).map_err(|error| {
            EncodeCommitError::Codec(CodecError::Encode {
                event_type: "commit envelope".to_owned(),
                reason: error.to_string(),
            })
        })?;
        stored.extend_from_slice(&body);
        return Ok(OutgoingCommit {
            headers: HeaderMap::new(),
            body: stored.into(),
            msg_id,
            position_after: (version, hash),
        });
    };
    let names = &*HEADER_NAMES;
    let mut headers = HeaderMap::new();
    let mut put = |index: usize, value: String| headers.insert(names[index].clone(), value);
    put(0, itoa::Buffer::new().format(version).to_owned());
    put(1, events_header);
    put(
        2,
        meta.correlation_id
            .hyphenated()
            .encode_lower(&mut uuid_text)
            .to_owned(),
    );
    put(
        3,
        meta.causation_id
            .hyphenated()
            .encode_lower(&mut uuid_text)
            .to_owned(),
    );
    put(4, meta.actor.clone());
    put(
        5,
        itoa::Buffer::new().format(meta.occurred_at_ms).to_owned(),
    );
    let mut chain_hex = [0u8; 129];
    hex_into(&expected.hash, &mut chain_hex[..64]);
    chain_hex[64] = b':';
    hex_into(&hash, &mut chain_hex[65..]);
    put(6, String::from_utf8_lossy(&chain_hex).into_owned());
    put(7, traceparent);
    Ok(OutgoingCommit {
        headers,
        body: body.into(),
        msg_id,
        position_after: (version, hash),
    })
}

/// Lower-case hex of `bytes` into `out` (twice as long), without allocating.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), bytes.len() * 2);
    // `encode_to_slice` only fails on a length mismatch, which the callers rule out.
    let _ = hex::encode_to_slice(bytes, out);
}

/// Why a stored message is not a well-formed commit.
#[derive(Debug, thiserror::Error)]
pub enum DecodeCommitError {
    #[error("subject {subject} is not <context>.ev.<aggregate>")]
    BadSubject { subject: String },
    #[error("header {name} is missing")]
    MissingHeader { name: &'static str },
    #[error("header {name} has a bad value {value:?}")]
    BadHeader { name: &'static str, value: String },
    #[error("body format {format} is unknown to this build")]
    UnknownBodyFormat { format: u16 },
    #[error("body does not decode: {reason}")]
    BadBody { reason: String },
    #[error("body holds {events} events but versions {first_version}..={version} say otherwise")]
    CountMismatch {
        events: usize,
        first_version: u64,
        version: u64,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Whether a message carries the envelope every commit has (a `Wangge-Version` header, or a
/// body that starts with [`BODY_MAGIC`]): a message with neither on a stream's subjects was
/// not written by the event store.
pub fn carries_envelope(headers: Option<&HeaderMap>, payload: &[u8]) -> bool {
    stored_format(headers, payload).is_some()
}

/// Which format a stored message is in, if it is a commit at all. The header wins: a
/// format-1 commit is recognised by its `Wangge-Version` header whatever its body holds.
fn stored_format(headers: Option<&HeaderMap>, payload: &[u8]) -> Option<CommitFormat> {
    if headers.is_some_and(|headers| headers.get(headers::VERSION).is_some()) {
        Some(CommitFormat::Headers)
    } else if payload.starts_with(BODY_MAGIC_PREFIX) {
        Some(CommitFormat::Body)
    } else {
        None
    }
}

/// How many events a stored commit holds, read from its envelope alone (the events are not
/// decoded); `None` for a message that is not a well-formed commit.
pub fn stored_event_count(headers: Option<&HeaderMap>, payload: &[u8]) -> Option<u64> {
    match stored_format(headers, payload)? {
        CommitFormat::Headers => headers?
            .get(headers::EVENTS)
            .map(|events| events.as_str().split(',').count() as u64),
        CommitFormat::Body => {
            let (envelope, _) = read_body_envelope(payload).ok()?;
            Some(envelope.version - envelope.first_version + 1)
        }
    }
}

/// The envelope of a body that starts with [`BODY_MAGIC_PREFIX`], and the events part after
/// it; its versions are checked (`1 <= first_version <= version`).
fn read_body_envelope(payload: &[u8]) -> Result<(BodyEnvelopeV2, &[u8]), DecodeCommitError> {
    let Some(envelope_bytes) = payload.strip_prefix(BODY_MAGIC) else {
        // `WGC` and another version byte: a later build's format.
        return Err(DecodeCommitError::UnknownBodyFormat {
            format: payload
                .get(BODY_MAGIC_PREFIX.len())
                .copied()
                .map_or(0, u16::from),
        });
    };
    let (envelope, events) =
        postcard::take_from_bytes::<BodyEnvelopeV2>(envelope_bytes).map_err(|error| {
            DecodeCommitError::BadBody {
                reason: format!("envelope: {error}"),
            }
        })?;
    if envelope.first_version == 0 || envelope.first_version > envelope.version {
        return Err(DecodeCommitError::BadBody {
            reason: format!(
                "envelope: versions {}..={}",
                envelope.first_version, envelope.version
            ),
        });
    }
    Ok((envelope, events))
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, DecodeCommitError> {
    headers
        .get(name)
        .map(|value| value.as_str())
        .ok_or(DecodeCommitError::MissingHeader { name })
}

fn parsed<T: std::str::FromStr>(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<T, DecodeCommitError> {
    let value = header(headers, name)?;
    value.parse().map_err(|_| DecodeCommitError::BadHeader {
        name,
        value: value.to_owned(),
    })
}

fn hex_hash(name: &'static str, value: &str) -> Result<[u8; 32], DecodeCommitError> {
    let mut hash = [0; 32];
    hex::decode_to_slice(value, &mut hash).map_err(|_| DecodeCommitError::BadHeader {
        name,
        value: value.to_owned(),
    })?;
    Ok(hash)
}

/// The envelope of a stored commit, read from headers only (cheap: no body decoding).
#[derive(Debug, Clone)]
pub(crate) struct StoredEnvelope {
    pub aggregate: String,
    pub command_id: String,
    pub first_version: u64,
    pub version: u64,
    pub meta: CommitMeta,
    pub previous_hash: [u8; 32],
    pub hash: [u8; 32],
    /// Format of the events part of the body (1 in both commit formats).
    pub body_format: u16,
    /// Where the envelope was read from.
    pub format: CommitFormat,
}

/// The envelope of a stored message and the events part of its body (the bytes the chain
/// hash covers), in either commit format.
pub(crate) fn decode_envelope<'a>(
    subject: &str,
    headers: &HeaderMap,
    payload: &'a [u8],
) -> Result<(StoredEnvelope, &'a [u8]), DecodeCommitError> {
    let aggregate = subject
        .split_once(".ev.")
        .map(|(_, aggregate)| aggregate)
        .ok_or_else(|| DecodeCommitError::BadSubject {
            subject: subject.to_owned(),
        })?;
    let msg_id = header(headers, headers::MSG_ID)?;
    let command_id = match msg_id.split_once('/') {
        Some((named, command_id)) if named == aggregate => command_id,
        _ => {
            return Err(DecodeCommitError::BadHeader {
                name: headers::MSG_ID,
                value: msg_id.to_owned(),
            });
        }
    };
    if stored_format(Some(headers), payload) == Some(CommitFormat::Body) {
        let (envelope, events) = read_body_envelope(payload)?;
        return Ok((
            StoredEnvelope {
                aggregate: aggregate.to_owned(),
                command_id: command_id.to_owned(),
                first_version: envelope.first_version,
                version: envelope.version,
                meta: CommitMeta {
                    correlation_id: Uuid::from_bytes(envelope.correlation_id),
                    causation_id: Uuid::from_bytes(envelope.causation_id),
                    actor: envelope.actor,
                    occurred_at_ms: envelope.occurred_at_ms,
                    traceparent: envelope.traceparent,
                },
                previous_hash: envelope.previous_hash,
                hash: envelope.hash,
                body_format: 1,
                format: CommitFormat::Body,
            },
            events,
        ));
    }
    let version: u64 = parsed(headers, headers::VERSION)?;
    let events = header(headers, headers::EVENTS)?;
    let event_count = events.split(',').count() as u64;
    let bad_events = || DecodeCommitError::BadHeader {
        name: headers::EVENTS,
        value: events.to_owned(),
    };
    let first_version = (version + 1)
        .checked_sub(event_count)
        .filter(|first| *first >= 1)
        .ok_or_else(bad_events)?;
    let chain = header(headers, headers::CHAIN)?;
    let (previous, own) = chain
        .split_once(':')
        .ok_or_else(|| DecodeCommitError::BadHeader {
            name: headers::CHAIN,
            value: chain.to_owned(),
        })?;
    let body_format = match headers.get(headers::BODY_FORMAT) {
        Some(_) => parsed(headers, headers::BODY_FORMAT)?,
        None => 1,
    };
    Ok((
        StoredEnvelope {
            aggregate: aggregate.to_owned(),
            command_id: command_id.to_owned(),
            first_version,
            version,
            meta: CommitMeta {
                correlation_id: parsed(headers, headers::CORRELATION_ID)?,
                causation_id: parsed(headers, headers::CAUSATION_ID)?,
                actor: header(headers, headers::ACTOR)?.to_owned(),
                occurred_at_ms: parsed(headers, headers::OCCURRED_AT)?,
                traceparent: headers
                    .get(headers::TRACEPARENT)
                    .map(|value| value.as_str().to_owned()),
            },
            previous_hash: hex_hash(headers::CHAIN, previous)?,
            hash: hex_hash(headers::CHAIN, own)?,
            body_format,
            format: CommitFormat::Headers,
        },
        payload,
    ))
}

impl StoredEnvelope {
    /// Recomputes the chain hash over this envelope and `body`.
    pub fn recomputed_hash(&self, body: &[u8]) -> [u8; 32] {
        chain_hash(&ChainFields {
            aggregate: &self.aggregate,
            command_id: &self.command_id,
            first_version: self.first_version,
            version: self.version,
            previous_hash: self.previous_hash,
            meta: &self.meta,
            body,
        })
    }
}

/// Events of a body in stored form (type, schema version, payload), before codec decoding.
/// The `Wangge-Events` header of a commit's events: `type/schema version/event id` each,
/// comma-separated.
fn describe_events<'a>(events: impl ExactSizeIterator<Item = (&'a str, u16, Uuid)>) -> String {
    let mut header = String::with_capacity(events.len() * 64);
    let mut uuid_text = Uuid::encode_buffer();
    for (index, (event_type, schema_version, id)) in events.enumerate() {
        if index > 0 {
            header.push(',');
        }
        header.push_str(event_type);
        header.push('/');
        header.push_str(itoa::Buffer::new().format(schema_version));
        header.push('/');
        header.push_str(id.hyphenated().encode_lower(&mut uuid_text));
    }
    header
}

/// Why a stored commit's `Wangge-Events` header does not describe its body, if it does not.
/// The header is not covered by the chain hash (tools route and audit by it without reading
/// bodies), so `verify` compares it with the body it lists.
pub(crate) fn events_header_mismatch(headers: &HeaderMap, body: &[RawEvent]) -> Option<String> {
    let described = describe_events(body.iter().map(|event| {
        (
            event.event_type.as_str(),
            event.schema_version,
            event.event_id,
        )
    }));
    let stored = headers.get(headers::EVENTS).map(|value| value.as_str());
    (stored != Some(described.as_str())).then(|| {
        format!(
            "{} is {:?}, but the body holds {described:?}",
            headers::EVENTS,
            stored.unwrap_or("")
        )
    })
}

pub(crate) struct RawEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u16,
    pub payload: Vec<u8>,
}

pub(crate) fn decode_body(format: u16, body: &[u8]) -> Result<Vec<RawEvent>, DecodeCommitError> {
    match format {
        1 => {
            let body: CommitBodyV1 =
                postcard::from_bytes(body).map_err(|error| DecodeCommitError::BadBody {
                    reason: error.to_string(),
                })?;
            Ok(body
                .events
                .into_iter()
                .map(|event| RawEvent {
                    event_id: Uuid::from_bytes(event.event_id),
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    payload: event.payload,
                })
                .collect())
        }
        format => Err(DecodeCommitError::UnknownBodyFormat { format }),
    }
}

/// The content digest of a commit about to be written (computed only when a stored
/// commit with the same command id must be compared).
pub(crate) fn commit_content_digest<C: EventCodec>(
    codec: &C,
    commit: &Commit<C::Event>,
) -> Result<[u8; 32], CodecError> {
    let encoded: Vec<EncodedEvent> = commit
        .events
        .iter()
        .map(|event| codec.encode(event))
        .collect::<Result<_, _>>()?;
    Ok(content_digest(encoded.iter().map(|e| {
        (
            e.event_type.as_str(),
            e.schema_version,
            e.payload.as_slice(),
        )
    })))
}

pub(crate) fn raw_content_digest(events: &[RawEvent]) -> [u8; 32] {
    content_digest(events.iter().map(|e| {
        (
            e.event_type.as_str(),
            e.schema_version,
            e.payload.as_slice(),
        )
    }))
}

/// The envelope, the events part the chain hash covers, and the events in stored form of a
/// stored message, its event count checked against its versions: what `load` and `verify`
/// both read.
pub(crate) fn decode_raw<'a>(
    subject: &str,
    headers: &HeaderMap,
    payload: &'a [u8],
) -> Result<(StoredEnvelope, &'a [u8], Vec<RawEvent>), DecodeCommitError> {
    let (envelope, events) = decode_envelope(subject, headers, payload)?;
    let raw = decode_body(envelope.body_format, events)?;
    let expected_count = envelope
        .version
        .checked_sub(envelope.first_version)
        .map(|n| n + 1);
    if expected_count != Some(raw.len() as u64) {
        return Err(DecodeCommitError::CountMismatch {
            events: raw.len(),
            first_version: envelope.first_version,
            version: envelope.version,
        });
    }
    Ok((envelope, events, raw))
}

/// Decodes a stored message into a [`RecordedCommit`], checking its event count against its
/// versions. Its hash is not recomputed here: the readers that check chains (`load`, `verify`)
/// do that; a replay (`export`, a projection rebuild) takes the commit as stored.
pub(crate) fn decode_commit<C: EventCodec>(
    codec: &C,
    sequence: u64,
    stored_at_ms: i64,
    subject: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<RecordedCommit<C::Event>, DecodeCommitError> {
    let (envelope, _, raw) = decode_raw(subject, headers, body)?;
    let aggregate =
        AggregateId::new(envelope.aggregate.clone()).map_err(|_| DecodeCommitError::BadHeader {
            name: "subject",
            value: envelope.aggregate.clone(),
        })?;
    let events = raw
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            Ok(RecordedEvent {
                event_id: raw.event_id,
                version: envelope.first_version + index as u64,
                event: codec.decode(&raw.event_type, raw.schema_version, &raw.payload)?,
                event_type: raw.event_type,
            })
        })
        .collect::<Result<Vec<_>, CodecError>>()?;
    Ok(RecordedCommit {
        aggregate,
        command_id: envelope.command_id,
        sequence,
        first_version: envelope.first_version,
        version: envelope.version,
        events,
        meta: envelope.meta,
        previous_hash: envelope.previous_hash,
        hash: envelope.hash,
        stored_at_ms,
    })
}

pub(crate) fn datetime_to_ms(datetime: time::OffsetDateTime) -> i64 {
    (datetime.unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod command_ids {
    use super::command_uuid;

    /// Stored in commits: the derivation must never change, and writers never share ids.
    #[test]
    fn a_command_id_gives_one_uuid_per_writer_forever() {
        let ids = [
            command_uuid("dispatch", "c1"),
            command_uuid("dispatch", "c1"),
            command_uuid("registry", "c1"),
            command_uuid("dispatch", "c2"),
        ];
        expect_test::expect![[r#"
            de301855-9b6a-8a95-b8c9-c3472719fc0a
            de301855-9b6a-8a95-b8c9-c3472719fc0a
            e9f3a902-4343-81e7-a265-59749813e7e4
            202dba4c-fe62-8ea0-a32c-433316b7d325"#]]
        .assert_eq(
            &ids.iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        assert_eq!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
        assert_ne!(ids[0], ids[3]);
    }
}

#[cfg(test)]
mod golden {
    //! Committed bytes of every body format and chain-hash version; they must decode and
    //! verify forever. Write new files with `WANGGE_WRITE_GOLDEN=1` (only missing ones).
    use super::*;
    use crate::PostcardCodec;

    fn golden_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
    }

    fn sample() -> (AggregateId, Position, Commit<(u64, String)>) {
        let meta = CommitMeta {
            correlation_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001),
            causation_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002),
            actor: "system:golden".to_owned(),
            occurred_at_ms: 1_767_225_600_000,
            traceparent: None,
        };
        let commit = Commit {
            command_id: "golden-1".to_owned(),
            events: vec![(7, "第一".to_owned()), (8, "second".to_owned())],
            event_ids: vec![
                Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0010),
                Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0011),
            ],
            meta,
        };
        let expected = Position {
            version: 3,
            sequence: 41,
            hash: [0xab; 32],
        };
        (
            AggregateId::new("sanming.golden").expect("valid"),
            expected,
            commit,
        )
    }

    /// [`sample`] encoded in `format`.
    fn encode_sample(format: CommitFormat) -> (Commit<(u64, String)>, OutgoingCommit) {
        let codec = PostcardCodec::<(u64, String)>::new("golden");
        let (aggregate, expected, commit) = sample();
        let outgoing =
            encode_commit(&codec, &aggregate, &expected, &commit, format).expect("encode");
        (commit, outgoing)
    }

    /// Decodes a stored sample commit and checks it holds [`sample`]'s events and versions.
    fn decode_sample(
        headers: &HeaderMap,
        body: &[u8],
        commit: &Commit<(u64, String)>,
    ) -> RecordedCommit<(u64, String)> {
        let codec = PostcardCodec::<(u64, String)>::new("golden");
        let decoded = decode_commit(&codec, 42, 0, "golden.ev.sanming.golden", headers, body)
            .expect("decode golden");
        let events: Vec<_> = decoded.events.iter().map(|e| e.event.clone()).collect();
        assert_eq!(events, commit.events);
        assert_eq!((decoded.first_version, decoded.version), (4, 5));
        assert_eq!(decoded.previous_hash, [0xab; 32]);
        decoded
    }

    /// The events header of an encoded commit describes its body; an edited one does not.
    #[test]
    fn an_edited_events_header_no_longer_describes_the_body() {
        let (_, outgoing) = encode_sample(CommitFormat::Headers);
        let body = decode_body(1, &outgoing.body).expect("body");
        assert_eq!(events_header_mismatch(&outgoing.headers, &body), None);
        let mut edited = outgoing.headers.clone();
        let renamed = edited
            .get(headers::EVENTS)
            .expect("events header")
            .as_str()
            .replacen("golden", "forged", 1);
        edited.insert(headers::EVENTS, renamed.as_str());
        let mismatch = events_header_mismatch(&edited, &body).expect("a mismatch");
        assert!(mismatch.contains("forged"), "{mismatch}");
        // Commits stored by earlier builds (the v1 golden file) describe their bodies too.
        let stored_body = std::fs::read(golden_dir().join("commit_v1.body")).expect("golden body");
        let stored_headers_text =
            std::fs::read_to_string(golden_dir().join("commit_v1.headers")).expect("headers");
        let mut stored_headers = HeaderMap::new();
        for line in stored_headers_text.lines() {
            let (name, value) = line.split_once(": ").expect("a header line");
            stored_headers.insert(name, value);
        }
        let stored = decode_body(1, &stored_body).expect("golden body decodes");
        assert_eq!(events_header_mismatch(&stored_headers, &stored), None);
    }

    /// Header text with white space at either end is refused before anything is stored: NATS
    /// clients trim header values on reading, so the stored commit would not verify.
    #[test]
    fn header_text_with_white_space_at_either_end_is_refused() {
        let codec = PostcardCodec::<(u64, String)>::new("golden");
        let (aggregate, expected, mut commit) = sample();
        let mut refused = Vec::new();
        for command_id in ["c1 ", " c1", "c1\u{3000}", "c 1"] {
            commit.command_id = command_id.to_owned();
            refused.push(
                match encode_commit(&codec, &aggregate, &expected, &commit, CommitFormat::Body) {
                    Ok(_) => format!("{command_id:?}: encoded"),
                    Err(error) => error.to_string(),
                },
            );
        }
        expect_test::expect![[r#"
            command id "c1 " cannot travel in a NATS header
            command id " c1" cannot travel in a NATS header
            command id "c1\u{3000}" cannot travel in a NATS header
            "c 1": encoded"#]]
        .assert_eq(&refused.join("\n"));
    }

    #[test]
    fn commit_v1_golden_bytes_decode_and_verify_forever() {
        let (commit, outgoing) = encode_sample(CommitFormat::Headers);
        let mut header_lines: Vec<String> = outgoing
            .headers
            .iter()
            .flat_map(|(name, values)| values.iter().map(move |value| format!("{name}: {value}")))
            .collect();
        header_lines.push(format!("{}: {}", headers::MSG_ID, outgoing.msg_id));
        header_lines.sort();
        let headers_text = header_lines.join("\n") + "\n";
        let body_path = golden_dir().join("commit_v1.body");
        let headers_path = golden_dir().join("commit_v1.headers");
        if std::env::var_os("WANGGE_WRITE_GOLDEN").is_some() && !body_path.exists() {
            std::fs::write(&body_path, &outgoing.body).expect("write golden body");
            std::fs::write(&headers_path, &headers_text).expect("write golden headers");
        }
        let golden_body = std::fs::read(&body_path).expect("golden body is committed");
        let golden_headers =
            std::fs::read_to_string(&headers_path).expect("golden headers are committed");
        // Today's encoder still produces the frozen bytes, except one header that is not
        // hashed: a derived `traceparent` said "sampled" (`-01`) until session 17 and says
        // "not sampled" (`-00`) since. The golden file keeps the old value, which must
        // still decode.
        assert_eq!(outgoing.body.as_ref(), golden_body.as_slice());
        let derived_traceparent =
            "traceparent: 00-01930000000070008000000000000001-8000000000000010";
        assert!(golden_headers.contains(&format!("{derived_traceparent}-01\n")));
        assert_eq!(
            headers_text,
            golden_headers.replace(
                &format!("{derived_traceparent}-01\n"),
                &format!("{derived_traceparent}-00\n"),
            )
        );
        // ...and the frozen bytes decode and verify.
        let mut headers = HeaderMap::new();
        for line in golden_headers.lines() {
            let (name, value) = line.split_once(": ").expect("name: value");
            headers.insert(name, value);
        }
        let decoded = decode_sample(&headers, &golden_body, &commit);
        let (envelope, events) =
            decode_envelope("golden.ev.sanming.golden", &headers, &golden_body).expect("envelope");
        assert_eq!(
            envelope.recomputed_hash(events),
            decoded.hash,
            "chain hash v1 is stable"
        );
        assert!(carries_envelope(Some(&headers), &golden_body));
        assert_eq!(stored_event_count(Some(&headers), &golden_body), Some(2));
    }

    /// Format 2 (the envelope in the body): frozen bytes, the same chain hash as format 1
    /// over the same commit, and only `Nats-Msg-Id` in the headers the store writes.
    #[test]
    fn commit_v2_golden_bytes_decode_and_verify_forever() {
        let (commit, outgoing) = encode_sample(CommitFormat::Body);
        assert!(outgoing.headers.is_empty(), "{:?}", outgoing.headers);
        assert_eq!(outgoing.msg_id, "sanming.golden/golden-1");
        let body_path = golden_dir().join("commit_v2.body");
        if std::env::var_os("WANGGE_WRITE_GOLDEN").is_some() && !body_path.exists() {
            std::fs::write(&body_path, &outgoing.body).expect("write golden body");
        }
        let golden_body = std::fs::read(&body_path).expect("golden body is committed");
        assert_eq!(outgoing.body.as_ref(), golden_body.as_slice());
        assert!(golden_body.starts_with(BODY_MAGIC));

        let mut headers = HeaderMap::new();
        headers.insert(headers::MSG_ID, "sanming.golden/golden-1");
        let decoded = decode_sample(&headers, &golden_body, &commit);
        assert_eq!(decoded.meta, {
            let mut meta = commit.meta.clone();
            meta.traceparent =
                Some("00-01930000000070008000000000000001-8000000000000010-00".to_owned());
            meta
        });
        // The chain hash is format 1's: one chain runs across commits of both formats.
        let v1 = std::fs::read_to_string(golden_dir().join("commit_v1.headers")).expect("v1");
        assert!(
            v1.contains(&format!(":{}\n", hex::encode(decoded.hash))),
            "{v1}"
        );
        let (envelope, events) =
            decode_envelope("golden.ev.sanming.golden", &headers, &golden_body).expect("envelope");
        assert_eq!(envelope.recomputed_hash(events), decoded.hash);
        assert!(carries_envelope(Some(&headers), &golden_body));
        assert!(carries_envelope(None, &golden_body));
        assert_eq!(stored_event_count(None, &golden_body), Some(2));

        // An edited envelope no longer verifies: the actor is under the hash.
        let edited = golden_body
            .windows(b"golden".len())
            .position(|window| window == b"golden")
            .expect("the actor is in the body");
        let mut forged = golden_body.clone();
        forged[edited] = b'G';
        let (envelope, events) =
            decode_envelope("golden.ev.sanming.golden", &headers, &forged).expect("envelope");
        assert_eq!(envelope.meta.actor, "system:Golden");
        assert_ne!(envelope.recomputed_hash(events), envelope.hash);
        // A later format is a commit this build cannot read, not a foreign message.
        let mut later = golden_body.clone();
        later[3] = 3;
        assert!(carries_envelope(None, &later));
        assert!(matches!(
            decode_envelope("golden.ev.sanming.golden", &headers, &later),
            Err(DecodeCommitError::UnknownBodyFormat { format: 3 })
        ));
        assert_eq!(stored_event_count(None, &later), None);
        // A body cut inside the envelope is refused, not misread.
        let cut = decode_envelope("golden.ev.sanming.golden", &headers, &golden_body[..20]);
        assert!(
            matches!(cut, Err(DecodeCommitError::BadBody { .. })),
            "{:?}",
            cut.map(|(envelope, _)| envelope)
        );
    }
}
