use std::time::Duration;

use async_nats::jetstream::{
    self, consumer,
    context::{CreateStreamErrorKind, PublishErrorKind},
    stream,
};
use futures::StreamExt as _;
use tracing::{debug, warn};

use crate::aggregate::AggregateId;
use crate::codec::EventCodec;
use crate::envelope::{
    self, Commit, CommitFormat, Position, RecordedCommit, datetime_to_ms, decode_body,
    decode_envelope, encode_commit, raw_content_digest,
};
use crate::error::{AppendError, ConflictReason, LoadError, OpenError};

/// Publish attempts for one append. Retrying is safe: the `Nats-Msg-Id` makes a repeat a no-op.
const APPEND_ATTEMPTS_MAX: usize = 8;
/// Attempts to create or update a stream at open when JetStream does not answer in time (a
/// cluster electing leaders, a loaded server): with the backoff below and the client's
/// request timeout, about 40 s before a service gives up starting.
const OPEN_ATTEMPTS_MAX: usize = 6;
/// First pause between those attempts; it doubles up to [`OPEN_BACKOFF_MAX`].
const OPEN_BACKOFF_MIN: Duration = Duration::from_millis(500);
const OPEN_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Pause between publish attempts (a cluster leader election takes a few seconds).
const APPEND_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Longest wait for one message while reading an aggregate to its known end.
const LOAD_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads of an aggregate's history tried before a transport error (a timed-out request, a
/// read that stalled while a cluster elected a stream leader) is returned. A read is
/// side-effect free, so trying it again is always safe.
const LOAD_ATTEMPTS_MAX: u32 = 4;
/// Pause before the second attempt; doubled for each further one.
const LOAD_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The bounded contexts that own a stream each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundedContext {
    /// Communities, buildings, grids and grid workers.
    Grids,
    /// Incident lifecycle, dispatch and whistles.
    Incidents,
    /// Submissions as received, including rejected ones.
    Intake,
}

impl BoundedContext {
    pub fn stream_name(self) -> &'static str {
        match self {
            BoundedContext::Grids => "GRIDS",
            BoundedContext::Incidents => "INCIDENTS",
            BoundedContext::Intake => "INTAKE",
        }
    }

    pub fn subject_prefix(self) -> &'static str {
        match self {
            BoundedContext::Grids => "grids",
            BoundedContext::Incidents => "incidents",
            BoundedContext::Intake => "intake",
        }
    }
}

/// How a context's stream is laid out and kept.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub stream_name: String,
    /// Commits go to `<subject_prefix>.ev.<aggregate id>`.
    pub subject_prefix: String,
    /// 1 on a single server, 3 on a cluster.
    pub replicas: usize,
    /// Window in which JetStream drops a repeated `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Forbid deleting and purging messages through the API (production default). Tests that
    /// simulate tampering turn it off.
    pub immutable: bool,
}

impl StreamSpec {
    pub fn for_context(
        context: BoundedContext,
        replicas: usize,
        duplicate_window: Duration,
    ) -> StreamSpec {
        StreamSpec {
            stream_name: context.stream_name().to_owned(),
            subject_prefix: context.subject_prefix().to_owned(),
            replicas,
            duplicate_window,
            immutable: true,
        }
    }

    /// A spec with its own names, for tests and benchmarks that need isolated streams.
    pub fn named(stream_name: &str, subject_prefix: &str) -> StreamSpec {
        StreamSpec {
            stream_name: stream_name.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            immutable: true,
        }
    }

    pub fn subject(&self, aggregate: &AggregateId) -> String {
        let mut subject =
            String::with_capacity(self.subject_prefix.len() + 4 + aggregate.as_str().len());
        subject.push_str(&self.subject_prefix);
        subject.push_str(".ev.");
        subject.push_str(aggregate.as_str());
        subject
    }

    /// The wildcard covering every aggregate of the context.
    pub fn all_subjects(&self) -> String {
        format!("{}.ev.>", self.subject_prefix)
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name.clone(),
            subjects: vec![self.all_subjects()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            allow_direct: true,
            deny_delete: self.immutable,
            deny_purge: self.immutable,
            description: Some(format!("wangge event log: {}", self.subject_prefix)),
            ..Default::default()
        }
    }
}

/// The outcome of a successful append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Where the aggregate stands after the commit.
    pub position: Position,
    /// True when this exact commit was already stored (a retried or redelivered command):
    /// nothing new was written.
    pub duplicate: bool,
}

/// An aggregate's whole history, read to its last commit.
#[derive(Debug, Clone)]
pub struct Loaded<E> {
    pub commits: Vec<RecordedCommit<E>>,
    pub position: Position,
}

/// A commit that does not follow the one before it in its aggregate's history, as an
/// inspection found it (see [`EventStore::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainBreak {
    pub sequence: u64,
    /// The commit's first version.
    pub version: u64,
    pub detail: String,
}

/// An aggregate's whole history read for an inspector: every decodable commit, and where the
/// chain breaks.
#[derive(Debug, Clone)]
pub struct Inspected<E> {
    pub commits: Vec<RecordedCommit<E>>,
    pub breaks: Vec<ChainBreak>,
}

/// What a read does with a commit that does not follow the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnBrokenLink {
    /// Stop with [`LoadError::ChainBroken`]: nothing is decided on a broken history.
    Refuse,
    /// Note it and read on: an inspector wants to see what is there.
    Report,
}

impl<E> Loaded<E> {
    pub fn events(&self) -> impl Iterator<Item = &E> {
        self.commits
            .iter()
            .flat_map(|commit| commit.events.iter().map(|recorded| &recorded.event))
    }
}

/// An event store for one bounded context. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventStore<C: EventCodec> {
    pub(crate) jetstream: jetstream::Context,
    pub(crate) stream: stream::Stream,
    pub(crate) spec: StreamSpec,
    pub(crate) codec: C,
    /// What [`EventStore::append`] writes ([`CommitFormat::Body`] unless told).
    pub(crate) commit_format: CommitFormat,
}

/// Whether creating a stream failed for a reason that passes: no answer in time, no
/// JetStream responder yet, or a cluster without a meta leader (error 10008).
fn open_may_succeed_later(error: &jetstream::context::CreateStreamError) -> bool {
    match error.kind() {
        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
        CreateStreamErrorKind::JetStream(error) => {
            error.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
        }
        _ => false,
    }
}

/// What opening a stream does to one that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingStream {
    /// Leave it as it is, and warn about each setting that differs from ours: a service
    /// starting. The operator's settings (`wangge up`, or a `nats stream edit`) stand; a host
    /// with a stale configuration cannot shrink a 3-replica stream by restarting.
    Keep,
    /// Update it to our settings: `wangge up`, which applies the configuration.
    Update,
}

/// Opens the stream `config` names, creating it when it is missing; an existing one is kept
/// or updated as `existing` says. A JetStream that does not answer yet (a cluster electing
/// its leaders, a busy server) is asked again, up to [`OPEN_ATTEMPTS_MAX`] times.
pub async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: stream::Config,
    existing: ExistingStream,
) -> Result<stream::Stream, OpenError> {
    let name = config.name.clone();
    let stream_error = |source| OpenError::Stream {
        stream: name.clone(),
        source,
    };
    let mut backoff = OPEN_BACKOFF_MIN;
    for attempt in 1.. {
        let created = match existing {
            ExistingStream::Update => jetstream
                .create_or_update_stream(config.clone())
                .await
                .map(drop),
            ExistingStream::Keep => match jetstream.get_stream(&name).await {
                Ok(stream) => {
                    warn_on_drift(&stream.cached_info().config, &config);
                    return Ok(stream);
                }
                Err(error) if is_stream_not_found(&error) => {
                    jetstream.create_stream(config.clone()).await.map(drop)
                }
                Err(error) if attempt < OPEN_ATTEMPTS_MAX && get_may_succeed_later(&error) => {
                    warn!(stream = %name, attempt, %error, "open stream: JetStream did not answer; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(OPEN_BACKOFF_MAX);
                    continue;
                }
                Err(error) => {
                    return Err(OpenError::GetStream {
                        stream: name.clone(),
                        reason: error.to_string(),
                    });
                }
            },
        };
        match created {
            Ok(()) => break,
            // Another process created it between our look and our create: look again.
            Err(error)
                if existing == ExistingStream::Keep
                    && attempt < OPEN_ATTEMPTS_MAX
                    && matches!(error.kind(), CreateStreamErrorKind::JetStream(ref source)
                        if source.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) => {}
            // A cluster electing leaders, or a server too busy to answer within the
            // request timeout: a service starting then must not give up on the first try.
            Err(error) if attempt < OPEN_ATTEMPTS_MAX && open_may_succeed_later(&error) => {
                warn!(stream = %name, attempt, %error, "create or update stream: JetStream did not answer; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(OPEN_BACKOFF_MAX);
            }
            Err(error) => return Err(stream_error(error)),
        }
    }
    jetstream
        .get_stream(&name)
        .await
        .map_err(|error| OpenError::GetStream {
            stream: name.clone(),
            reason: error.to_string(),
        })
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref source)
        if source.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Whether looking up a stream failed for a reason that passes (see
/// [`open_may_succeed_later`]).
fn get_may_succeed_later(error: &jetstream::context::GetStreamError) -> bool {
    match error.kind() {
        jetstream::context::GetStreamErrorKind::Request => true,
        jetstream::context::GetStreamErrorKind::JetStream(source) => {
            source.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
        }
        _ => false,
    }
}

/// Logs each setting of an existing stream that differs from the one a service would
/// create: the stream is left as it is (`wangge up` applies the settings).
fn warn_on_drift(found: &stream::Config, wanted: &stream::Config) {
    let mut differences = Vec::new();
    if found.num_replicas != wanted.num_replicas {
        differences.push(format!(
            "replicas {} (ours {})",
            found.num_replicas, wanted.num_replicas
        ));
    }
    if found.duplicate_window != wanted.duplicate_window {
        differences.push(format!(
            "duplicate window {} s (ours {} s)",
            found.duplicate_window.as_secs(),
            wanted.duplicate_window.as_secs()
        ));
    }
    if found.subjects != wanted.subjects {
        differences.push(format!(
            "subjects {:?} (ours {:?})",
            found.subjects, wanted.subjects
        ));
    }
    if found.max_age != wanted.max_age {
        differences.push(format!(
            "max age {} s (ours {} s)",
            found.max_age.as_secs(),
            wanted.max_age.as_secs()
        ));
    }
    if !differences.is_empty() {
        warn!(
            stream = %wanted.name,
            differences = %differences.join(", "),
            "the stream's settings differ from this service's; left as they are (`wangge up` applies the settings)"
        );
    }
}

impl<C: EventCodec> EventStore<C> {
    /// A store on the context's stream, created when it is missing; an existing stream is
    /// left as it is (see [`ExistingStream::Keep`]).
    pub async fn open(
        jetstream: jetstream::Context,
        spec: StreamSpec,
        codec: C,
    ) -> Result<EventStore<C>, OpenError> {
        Self::open_with(jetstream, spec, codec, ExistingStream::Keep).await
    }

    /// A store on the context's stream, created when it is missing and updated to `spec`
    /// when it exists (`wangge up`).
    pub async fn open_applying(
        jetstream: jetstream::Context,
        spec: StreamSpec,
        codec: C,
    ) -> Result<EventStore<C>, OpenError> {
        Self::open_with(jetstream, spec, codec, ExistingStream::Update).await
    }

    async fn open_with(
        jetstream: jetstream::Context,
        spec: StreamSpec,
        codec: C,
        existing: ExistingStream,
    ) -> Result<EventStore<C>, OpenError> {
        let stream = ensure_stream(&jetstream, spec.stream_config(), existing).await?;
        Ok(EventStore {
            jetstream,
            stream,
            spec,
            codec,
            commit_format: CommitFormat::default(),
        })
    }

    /// A store on the context's existing stream, without creating or updating it: for
    /// read-only credentials (auditors, exports) that may not manage streams.
    pub async fn open_existing(
        jetstream: jetstream::Context,
        spec: StreamSpec,
        codec: C,
    ) -> Result<EventStore<C>, OpenError> {
        let stream = jetstream
            .get_stream(&spec.stream_name)
            .await
            .map_err(|error| OpenError::GetStream {
                stream: spec.stream_name.clone(),
                reason: error.to_string(),
            })?;
        Ok(EventStore {
            jetstream,
            stream,
            spec,
            codec,
            commit_format: CommitFormat::default(),
        })
    }

    /// Writes commits in `format` from now on (both formats are always read). A city
    /// upgrading from a build that reads only [`CommitFormat::Headers`] keeps writing that
    /// until every reader runs a build that reads both (ARCHITECTURE.md, "Upgrades").
    #[must_use]
    pub fn with_commit_format(mut self, format: CommitFormat) -> Self {
        self.commit_format = format;
        self
    }

    /// What [`EventStore::append`] writes.
    pub fn commit_format(&self) -> CommitFormat {
        self.commit_format
    }

    pub fn spec(&self) -> &StreamSpec {
        &self.spec
    }

    pub fn codec(&self) -> &C {
        &self.codec
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn subject(&self, aggregate: &AggregateId) -> String {
        self.spec.subject(aggregate)
    }

    /// Appends one commit to `aggregate`, which the caller believes to be at `expected`.
    ///
    /// - another writer got there first → `Conflict(StaleVersion)`;
    /// - the same command id and the same events are already stored → `Ok` with
    ///   `duplicate: true`, nothing written;
    /// - the same command id with other events → `Conflict(CommandIdReused)`.
    pub async fn append(
        &self,
        aggregate: &AggregateId,
        expected: &Position,
        commit: &Commit<C::Event>,
    ) -> Result<Appended, AppendError> {
        let subject = self.subject(aggregate);
        let mut attempt = 0;
        let (ack, (version, hash)) = loop {
            attempt += 1;
            // Encoding is deterministic (event ids live in the commit), so each attempt
            // encodes afresh and moves its headers into the publish instead of cloning them.
            let outgoing =
                encode_commit(&self.codec, aggregate, expected, commit, self.commit_format)
                    .map_err(|source| AppendError::Encode {
                        subject: subject.clone(),
                        source,
                    })?;
            let position_after = outgoing.position_after;
            let publish = jetstream::message::PublishMessage::build()
                .headers(outgoing.headers)
                .payload(outgoing.body)
                .message_id(&outgoing.msg_id)
                .expected_last_subject_sequence(expected.sequence);
            let result = match self.jetstream.send_publish(subject.clone(), publish).await {
                Ok(future) => future.await,
                Err(error) => Err(error),
            };
            match result {
                Ok(ack) => break (ack, position_after),
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    // nats-server checks the expected subject sequence before the Msg-Id, so
                    // a retry of a commit that was stored also lands here: look at what
                    // follows `expected` on this subject.
                    return self
                        .resolve_sequence_conflict(&subject, expected, commit)
                        .await;
                }
                Err(error) if attempt < APPEND_ATTEMPTS_MAX && retryable(error.kind()) => {
                    warn!(%subject, attempt, %error, "append not acknowledged; retrying with the same Msg-Id");
                    tokio::time::sleep(APPEND_RETRY_PAUSE).await;
                }
                Err(source) => {
                    return Err(AppendError::Publish {
                        subject,
                        attempts: attempt,
                        source,
                    });
                }
            }
        };
        if !ack.duplicate {
            return Ok(Appended {
                position: Position {
                    version,
                    sequence: ack.sequence,
                    hash,
                },
                duplicate: false,
            });
        }
        // JetStream dropped it as a repeat of an earlier Msg-Id: same content, or a reused id?
        let stored = self
            .stream
            .direct_get(ack.sequence)
            .await
            .map_err(|error| AppendError::DuplicateCheck {
                subject: subject.clone(),
                sequence: ack.sequence,
                reason: error.to_string(),
            })?;
        self.compare_stored(&subject, &stored, commit)
    }

    /// The aggregate is not at `expected`. If the commit right after `expected` is this very
    /// command, the append already happened (a retry or a redelivered input): a duplicate.
    async fn resolve_sequence_conflict(
        &self,
        subject: &str,
        expected: &Position,
        commit: &Commit<C::Event>,
    ) -> Result<Appended, AppendError> {
        let stale = || AppendError::Conflict {
            subject: subject.to_owned(),
            reason: ConflictReason::StaleVersion {
                expected: *expected,
            },
        };
        let next = self
            .stream
            .direct_get_next_for_subject(subject.to_owned(), Some(expected.sequence + 1))
            .await;
        let stored = match next {
            Ok(stored) => stored,
            Err(error) if matches!(error.kind(), stream::DirectGetErrorKind::NotFound) => {
                return Err(stale());
            }
            Err(error) => {
                return Err(AppendError::DuplicateCheck {
                    subject: subject.to_owned(),
                    sequence: expected.sequence + 1,
                    reason: error.to_string(),
                });
            }
        };
        let stored_msg_id = stored
            .headers
            .get(envelope::headers::MSG_ID)
            .map(|value| value.as_str());
        let stored_command = stored_msg_id
            .and_then(|msg_id| msg_id.split_once('/'))
            .map(|(_, command)| command);
        if stored_command != Some(commit.command_id.as_str()) {
            return Err(stale());
        }
        self.compare_stored(subject, &stored, commit)
    }

    /// `stored` carries our command id: the same events make it a duplicate, others a conflict.
    fn compare_stored(
        &self,
        subject: &str,
        stored: &async_nats::jetstream::message::StreamMessage,
        commit: &Commit<C::Event>,
    ) -> Result<Appended, AppendError> {
        let duplicate_check = |reason: String| AppendError::DuplicateCheck {
            subject: subject.to_owned(),
            sequence: stored.sequence,
            reason,
        };
        let (envelope, events) = decode_envelope(&stored.subject, &stored.headers, &stored.payload)
            .map_err(|error| duplicate_check(error.to_string()))?;
        let raw = decode_body(envelope.body_format, events)
            .map_err(|error| duplicate_check(error.to_string()))?;
        let ours = envelope::commit_content_digest(&self.codec, commit)
            .map_err(|error| duplicate_check(error.to_string()))?;
        if raw_content_digest(&raw) != ours {
            return Err(AppendError::Conflict {
                subject: subject.to_owned(),
                reason: ConflictReason::CommandIdReused {
                    command_id: commit.command_id.clone(),
                    stored_sequence: stored.sequence,
                },
            });
        }
        debug!(%subject, sequence = stored.sequence, "commit already stored; nothing written");
        Ok(Appended {
            position: Position {
                version: envelope.version,
                sequence: stored.sequence,
                hash: envelope.hash,
            },
            duplicate: true,
        })
    }

    /// The position of an aggregate's last commit, or [`Position::NEW`] if it has none.
    ///
    /// Read from the stream's leader (`STREAM.MSG.GET`), not by a direct get, which any
    /// replica answers: on a replicated stream a replica a commit has not reached yet would
    /// answer an older position, and what callers decide on it would be stale: a refusal
    /// (`not_registered` for a community another instance registered a moment ago), or a
    /// history read to its end that ends before the commit that made the caller read it.
    pub async fn last_position(&self, aggregate: &AggregateId) -> Result<Position, LoadError> {
        let subject = self.subject(aggregate);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => {
                let (envelope, _) =
                    decode_envelope(&message.subject, &message.headers, &message.payload).map_err(
                        |source| LoadError::Corrupt {
                            subject: subject.clone(),
                            sequence: message.sequence,
                            source,
                        },
                    )?;
                Ok(Position {
                    version: envelope.version,
                    sequence: message.sequence,
                    hash: envelope.hash,
                })
            }
            Err(error)
                if matches!(
                    error.kind(),
                    stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok(Position::NEW)
            }
            Err(error) => Err(LoadError::LastCommit {
                subject,
                reason: error.to_string(),
            }),
        }
    }

    /// Reads an aggregate's whole history up to its last commit (known before reading starts,
    /// so the read ends there and never waits for a timeout), checking the hash chain.
    pub async fn load(&self, aggregate: &AggregateId) -> Result<Loaded<C::Event>, LoadError> {
        self.load_after(aggregate, Position::NEW).await
    }

    /// Reads the commits after `after` (e.g. a snapshot's position) up to the last one.
    /// Transport errors are retried (at most [`LOAD_ATTEMPTS_MAX`] attempts); a corrupt
    /// commit or a broken chain is returned at once.
    pub async fn load_after(
        &self,
        aggregate: &AggregateId,
        after: Position,
    ) -> Result<Loaded<C::Event>, LoadError> {
        let (loaded, breaks) = self
            .load_retrying(aggregate, after, OnBrokenLink::Refuse)
            .await?;
        debug_assert!(breaks.is_empty());
        Ok(loaded)
    }

    /// Reads an aggregate's whole history like [`EventStore::load`], but reads on past a
    /// broken link (a commit edited, forged or out of order), listing where the chain breaks.
    /// For `wangge audit timeline`: an inspector wants to see a tampered history, not an
    /// error. A commit that does not decode still ends the read ([`LoadError::Corrupt`]).
    pub async fn inspect(&self, aggregate: &AggregateId) -> Result<Inspected<C::Event>, LoadError> {
        let (loaded, breaks) = self
            .load_retrying(aggregate, Position::NEW, OnBrokenLink::Report)
            .await?;
        Ok(Inspected {
            commits: loaded.commits,
            breaks,
        })
    }

    async fn load_retrying(
        &self,
        aggregate: &AggregateId,
        after: Position,
        on_broken_link: OnBrokenLink,
    ) -> Result<(Loaded<C::Event>, Vec<ChainBreak>), LoadError> {
        let mut pause = LOAD_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            match self.load_after_once(aggregate, after, on_broken_link).await {
                Err(error @ (LoadError::LastCommit { .. } | LoadError::Read { .. }))
                    if attempt < LOAD_ATTEMPTS_MAX =>
                {
                    warn!(%error, attempt, "load failed; reading again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn load_after_once(
        &self,
        aggregate: &AggregateId,
        after: Position,
        on_broken_link: OnBrokenLink,
    ) -> Result<(Loaded<C::Event>, Vec<ChainBreak>), LoadError> {
        let subject = self.subject(aggregate);
        let last = self.last_position(aggregate).await?;
        if last.sequence <= after.sequence {
            let loaded = Loaded {
                commits: Vec::new(),
                position: after,
            };
            return Ok((loaded, Vec::new()));
        }
        let read_error = |reason: String| LoadError::Read {
            subject: subject.clone(),
            reason,
        };
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after.sequence + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let consumer_name = consumer.cached_info().name.clone();
        let read = self
            .read_commits(consumer, &subject, after, last, on_broken_link)
            .await;
        // The server would keep the consumer for its inactivity threshold (30 s for an
        // ordered consumer): at a few dozen loads a second (dispatch reads an incident's
        // history before deciding a console command) they piled up to the server's consumer
        // limit and every later read failed ("maximum consumers limit reached", seen in
        // `make demo`). A consumer the ordered stream re-created after a gap is not named
        // here and expires by itself. The delete runs beside the caller: a slow answer to it
        // must not hold up a service loop that loaded an incident.
        let stream = self.stream.clone();
        tokio::spawn(async move {
            if let Err(error) = stream.delete_consumer(&consumer_name).await {
                debug!(%error, subject, "delete the load's consumer; it expires by itself");
            }
        });
        read
    }

    /// Reads the commits of `subject` after `after` up to `last` from a fresh ordered
    /// consumer, checking every link.
    async fn read_commits(
        &self,
        consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
        subject: &str,
        after: Position,
        last: Position,
        on_broken_link: OnBrokenLink,
    ) -> Result<(Loaded<C::Event>, Vec<ChainBreak>), LoadError> {
        let read_error = |reason: String| LoadError::Read {
            subject: subject.to_owned(),
            reason,
        };
        let mut messages = consumer
            .messages()
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let no_headers = async_nats::HeaderMap::new();
        let mut commits = Vec::new();
        let mut breaks = Vec::new();
        let mut position = after;
        while position.sequence < last.sequence {
            let message = tokio::time::timeout(LOAD_MESSAGE_TIMEOUT, messages.next())
                .await
                .map_err(|_| read_error(format!("no message within {LOAD_MESSAGE_TIMEOUT:?}")))?
                .ok_or_else(|| read_error("message stream ended".to_owned()))?
                .map_err(|error| read_error(error.to_string()))?;
            let info = message
                .info()
                .map_err(|error| read_error(error.to_string()))?;
            let sequence = info.stream_sequence;
            let stored_at_ms = datetime_to_ms(info.published);
            let headers = message.headers.as_ref().unwrap_or(&no_headers);
            let commit = envelope::decode_commit(
                &self.codec,
                sequence,
                stored_at_ms,
                &message.subject,
                headers,
                &message.payload,
            )
            .map_err(|source| LoadError::Corrupt {
                subject: subject.to_owned(),
                sequence,
                source,
            })?;
            match check_link(subject, &position, &commit, &message.payload, headers) {
                Ok(()) => {}
                Err(LoadError::ChainBroken { detail, .. })
                    if on_broken_link == OnBrokenLink::Report =>
                {
                    breaks.push(ChainBreak {
                        sequence,
                        version: commit.first_version,
                        detail,
                    });
                }
                Err(error) => return Err(error),
            }
            position = commit.position();
            commits.push(commit);
        }
        Ok((Loaded { commits, position }, breaks))
    }
}

/// The commit must follow `previous` in version and hash, and its own hash must be right.
fn check_link<E>(
    subject: &str,
    previous: &Position,
    commit: &RecordedCommit<E>,
    body: &[u8],
    headers: &async_nats::HeaderMap,
) -> Result<(), LoadError> {
    let broken = |detail: String| LoadError::ChainBroken {
        subject: subject.to_owned(),
        sequence: commit.sequence,
        detail,
    };
    if commit.first_version != previous.version + 1 {
        return Err(broken(format!(
            "version {} follows version {}",
            commit.first_version, previous.version
        )));
    }
    // A load that starts after a snapshot knows the previous hash only if the snapshot did.
    if !(previous.is_new() && commit.first_version != 1) && commit.previous_hash != previous.hash {
        return Err(broken(
            "previous hash does not match the preceding commit".to_owned(),
        ));
    }
    let (envelope, events) =
        decode_envelope(subject, headers, body).map_err(|source| LoadError::Corrupt {
            subject: subject.to_owned(),
            sequence: commit.sequence,
            source,
        })?;
    if envelope.recomputed_hash(events) != commit.hash {
        return Err(broken(
            "stored hash does not match the commit's content".to_owned(),
        ));
    }
    Ok(())
}

fn retryable(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::Other
    ) || kind == PublishErrorKind::StreamNotFound
}
