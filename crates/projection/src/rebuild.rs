//! Rebuilds and as-of replays: fold the streams from sequence 0 into a fresh bucket.
//!
//! A rebuild first claims its generation (`current + 1`) in the meta bucket, so a second
//! rebuild started meanwhile is refused before it touches anything ([`crate::claim`]), then
//! writes that generation and swaps the pointer with a compare-and-set; a running builder sees
//! the swap and continues the new generation after its checkpoint. An as-of replay writes a
//! separate bucket `PROJ_ASOF_<label>` that nothing swaps to, for audits.

use std::time::Instant;

use async_nats::jetstream;
use eventstore::{EventStore, ReplayRange, StreamSpec};
use tracing::{info, warn};

use crate::claim::Claim;
use crate::fold::Projector;
use crate::keys;
use crate::service::{GridsStore, IncidentStore, ServiceError};
use crate::store::{self, Pointer, StoreError};
use crate::wire::ScoreWeights;

/// INCIDENTS sequences replayed per chunk; the incident values of a chunk are written while
/// the next chunk is read.
pub const REBUILD_CHUNK_SEQUENCES: u64 = 50_000;
/// Chunks read concurrently (each by its own ephemeral range consumer).
pub const REPLAY_CHUNKS_IN_FLIGHT: usize = 2;
/// Messages per pull request while replaying.
pub const REPLAY_BATCH_MAX: usize = 1_000;

/// Where a replay stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The streams' last sequences when the replay starts.
    End,
    /// INCIDENTS up to this sequence; GRIDS up to the time that commit was stored.
    Sequence(u64),
    /// Both streams up to commits stored at or before this time (UTC ms).
    Time(i64),
}

impl Until {
    /// Bucket label of an as-of replay.
    pub fn label(self) -> String {
        match self {
            Until::End => "END".to_owned(),
            Until::Sequence(sequence) => format!("S{sequence}"),
            Until::Time(ms) => format!("T{ms}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub incidents: StreamSpec,
    pub grids: StreamSpec,
    pub replicas: usize,
    pub weights: ScoreWeights,
    pub profile: Option<standards::Profile>,
    pub chunk_sequences: u64,
    /// Chunks read concurrently (at least 1).
    pub chunks_in_flight: usize,
    /// Write each chunk's incident values while the next chunks are read (true), or all of
    /// them after the replay (false).
    pub write_during_replay: bool,
}

impl RebuildOptions {
    pub fn new(incidents: StreamSpec, grids: StreamSpec) -> RebuildOptions {
        RebuildOptions {
            incidents,
            grids,
            replicas: 1,
            weights: ScoreWeights::default(),
            profile: None,
            chunk_sequences: REBUILD_CHUNK_SEQUENCES,
            chunks_in_flight: REPLAY_CHUNKS_IN_FLIGHT,
            write_during_replay: true,
        }
    }
}

/// What a rebuild or as-of replay did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub bucket: String,
    pub generation: u64,
    /// The generation that was current before the swap (rebuild only).
    pub previous_generation: Option<u64>,
    pub incidents_sequence: u64,
    pub grids_sequence: u64,
    pub commits: u64,
    pub events: u64,
    pub incidents: u64,
    pub keys_written: u64,
    pub elapsed_ms: u64,
    /// Time spent folding (inside the replay), and when the last chunk's values were stored.
    pub fold_ms: u64,
    /// Time the fold waited for chunks to be read and decoded.
    pub read_wait_ms: u64,
    pub chunks_written_ms: u64,
    /// INCIDENTS commits that did not follow their incident's history as folded so far (a
    /// commit before them is missing from the stream: lost from a damaged store, or deleted),
    /// and so were not folded: those incidents stand as of their last commit that followed.
    /// `wangge audit verify` names what is missing.
    pub commits_not_following: u64,
    /// The first of them (at most [`NOT_FOLLOWING_LISTED_MAX`]): stream sequence and aggregate.
    pub not_following: Vec<(u64, String)>,
}

/// Commits not following their incident's history listed in a [`RebuildReport`] (and logged);
/// the rest are only counted.
pub const NOT_FOLLOWING_LISTED_MAX: usize = 20;

/// Notes a commit the projector did not fold because it does not follow (see
/// [`RebuildReport::commits_not_following`]).
fn note_not_following(
    applied: &crate::fold::Applied,
    commit: &eventstore::RecordedCommit<domain::incident::IncidentEvent>,
    count: &mut u64,
    listed: &mut Vec<(u64, String)>,
) {
    if let crate::fold::Applied::Gap { held_version, .. } = applied {
        *count += 1;
        if listed.len() < NOT_FOLLOWING_LISTED_MAX {
            warn!(
                aggregate = %commit.aggregate,
                sequence = commit.sequence,
                held_version,
                first_version = commit.first_version,
                "commit does not follow its incident's history (one before it is missing); not folded"
            );
            listed.push((commit.sequence, commit.aggregate.to_string()));
        }
    }
}

/// Progress of a replay: INCIDENTS sequence reached of the target.
pub trait ProgressSink: Sync {
    fn target(&self, _incidents_target: u64) {}
    fn reached(&self, _incidents_sequence: u64) {}
}

/// A sink that logs nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl ProgressSink for NoProgress {}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("replay {stream}: {reason}")]
    Replay { stream: String, reason: String },
    #[error(
        "open stream {stream}: {reason} (a replay reads existing streams and never creates \
         them: is this the right server? `wangge up` creates them)"
    )]
    NoStream { stream: String, reason: String },
    #[error(
        "another rebuild swapped the read models to generation {swapped_to} while this one \
         started (it had read generation {read}); nothing was changed: run it again"
    )]
    SwappedMeanwhile { read: u64, swapped_to: u64 },
    #[error("{stream} ends at sequence {last}; there is nothing to replay up to sequence {asked}")]
    PastEnd {
        stream: String,
        last: u64,
        asked: u64,
    },
}

/// Opens both event streams as they are. Unlike the service, a replay never creates one: a
/// job pointed at the wrong server must fail, not report an empty city.
async fn open_existing_stores(
    jetstream: &jetstream::Context,
    options: &RebuildOptions,
) -> Result<(IncidentStore, GridsStore), RebuildError> {
    let missing = |spec: &StreamSpec| {
        let stream = spec.stream_name.clone();
        move |error: eventstore::OpenError| RebuildError::NoStream {
            stream,
            reason: error.to_string(),
        }
    };
    let incidents = EventStore::open_existing(
        jetstream.clone(),
        options.incidents.clone(),
        codecs::IncidentCodec,
    )
    .await
    .map_err(missing(&options.incidents))?;
    let grids = EventStore::open_existing(
        jetstream.clone(),
        options.grids.clone(),
        registry::RegistryCodec,
    )
    .await
    .map_err(missing(&options.grids))?;
    Ok((incidents, grids))
}

fn replay_error(stream: &str) -> impl Fn(eventstore::LoadError) -> RebuildError + '_ {
    move |error| RebuildError::Replay {
        stream: stream.to_owned(),
        reason: error.to_string(),
    }
}

/// When INCIDENTS stored sequence `sequence` (to cut GRIDS at the same moment). Before, a
/// sequence that held no commit gave no time, and GRIDS was folded uncut.
async fn stored_at(store: &IncidentStore, sequence: u64) -> Result<i64, RebuildError> {
    let stream = &store.spec().stream_name;
    store
        .stored_at_ms(sequence)
        .await
        .map_err(replay_error(stream))?
        .ok_or_else(|| RebuildError::Replay {
            stream: stream.clone(),
            reason: format!("no message is stored at sequence {sequence}; ask for another"),
        })
}

/// Hands the models folded since the last call to a write task, once the previous write has
/// finished (one write in flight keeps memory bounded while the fold goes on). Returns how
/// many keys were handed over.
async fn write_behind(
    projector: &mut Projector,
    writing: &mut Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    kv: &async_nats::jetstream::kv::Store,
    bucket: &str,
) -> Result<u64, RebuildError> {
    let rendered = projector.take_dirty(true);
    let keys = rendered.len() as u64;
    if let Some(previous) = writing.take() {
        previous.await.expect("write task")?;
    }
    let (kv_chunk, bucket_chunk) = (kv.clone(), bucket.to_owned());
    *writing = Some(tokio::spawn(async move {
        store::write_flush(&kv_chunk, &bucket_chunk, rendered, None).await
    }));
    Ok(keys)
}

/// Folds both streams up to `until` into `bucket` (emptied first) and writes the checkpoint.
pub async fn build_into(
    jetstream: &jetstream::Context,
    options: &RebuildOptions,
    bucket: &str,
    generation: u64,
    until: Until,
    progress: &dyn ProgressSink,
    mut claim: Option<&mut Claim>,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let (incident_store, grids_store) = open_existing_stores(jetstream, options).await?;
    let incidents_last = incident_store
        .last_sequence()
        .await
        .map_err(replay_error(&options.incidents.stream_name))?;
    if let Until::Sequence(asked) = until
        && asked > incidents_last
    {
        return Err(RebuildError::PastEnd {
            stream: options.incidents.stream_name.clone(),
            last: incidents_last,
            asked,
        });
    }
    let kv = store::fresh_bucket(jetstream, bucket, options.replicas).await?;
    // INCIDENTS is cut by sequence or by time; GRIDS (another stream, other sequences) always
    // by time: as of a sequence, at the time INCIDENTS stored it. INCIDENTS as of a sequence is
    // never cut by time: a server's timestamps need not grow with the sequence (a new leader
    // with a clock behind), and a time cut could stop short of the sequence asked for.
    let (incidents_target, time_cut, grids_cut) = match until {
        Until::End => (incidents_last, None, None),
        Until::Sequence(sequence) => {
            let target = sequence;
            let cut = if target == 0 {
                Some(i64::MIN)
            } else {
                Some(stored_at(&incident_store, target).await?)
            };
            (target, None, cut)
        }
        Until::Time(ms) => (incidents_last, Some(ms), Some(ms)),
    };
    let mut projector = Projector::new(options.weights, options.profile.clone(), false);
    // GRIDS first (small), cut at the time INCIDENTS is cut at.
    grids_store
        .replay(ReplayRange::default(), |commit| {
            if grids_cut.is_none_or(|cut| commit.stored_at_ms <= cut) {
                projector.apply_grids_commit(&commit);
            }
        })
        .await
        .map_err(replay_error(&options.grids.stream_name))?;
    progress.target(incidents_target);
    let mut commits = 0u64;
    let mut events = 0u64;
    let mut keys_written = 0u64;
    let mut fold_time = std::time::Duration::ZERO;
    let mut wait_time = std::time::Duration::ZERO;
    let mut writing: Option<tokio::task::JoinHandle<Result<(), StoreError>>> = None;
    let chunk = options.chunk_sequences.max(1);
    // Chunks are read (and decoded) by concurrent range consumers, folded strictly in stream
    // order, and each chunk's incident values are written while the next ones are read.
    let mut reads = std::collections::VecDeque::new();
    let mut next_after = 0u64;
    let mut not_following_count = 0u64;
    let mut not_following: Vec<(u64, String)> = Vec::new();
    let mut past_cut = false;
    // One chunk at a time: fold inside the replay callback (no hand-over of decoded chunks).
    while options.chunks_in_flight <= 1 && next_after < incidents_target && !past_cut {
        let until_sequence = (next_after + chunk).min(incidents_target);
        let folding_started = Instant::now();
        let mut folding = std::time::Duration::ZERO;
        incident_store
            .replay(
                ReplayRange {
                    after_sequence: next_after,
                    until_sequence: Some(until_sequence),
                    batch_max: REPLAY_BATCH_MAX,
                },
                |commit| {
                    if past_cut || time_cut.is_some_and(|cut| commit.stored_at_ms > cut) {
                        past_cut = true;
                        return;
                    }
                    let started = Instant::now();
                    commits += 1;
                    events += commit.events.len() as u64;
                    let applied = projector.apply_incident_commit(&commit);
                    note_not_following(
                        &applied,
                        &commit,
                        &mut not_following_count,
                        &mut not_following,
                    );
                    folding += started.elapsed();
                },
            )
            .await
            .map_err(replay_error(&options.incidents.stream_name))?;
        fold_time += folding;
        wait_time += folding_started.elapsed().saturating_sub(folding);
        next_after = until_sequence;
        progress.reached(next_after);
        if let Some(claim) = claim.as_deref_mut() {
            claim.renew().await?;
        }
        if options.write_during_replay {
            keys_written += write_behind(&mut projector, &mut writing, &kv, bucket).await?;
        }
    }
    loop {
        while reads.len() < options.chunks_in_flight.max(1) && next_after < incidents_target {
            let until_sequence = (next_after + chunk).min(incidents_target);
            let reader = incident_store.clone();
            let after = next_after;
            reads.push_back(tokio::spawn(async move {
                let mut commits = Vec::new();
                reader
                    .replay(
                        ReplayRange {
                            after_sequence: after,
                            until_sequence: Some(until_sequence),
                            batch_max: REPLAY_BATCH_MAX,
                        },
                        |commit| commits.push(commit),
                    )
                    .await
                    .map(|_| commits)
            }));
            next_after = until_sequence;
        }
        let Some(read) = reads.pop_front() else {
            break;
        };
        let waiting = Instant::now();
        let chunk_commits = read
            .await
            .expect("replay task")
            .map_err(replay_error(&options.incidents.stream_name))?;
        wait_time += waiting.elapsed();
        let folding = Instant::now();
        for commit in &chunk_commits {
            if time_cut.is_some_and(|cut| commit.stored_at_ms > cut) {
                past_cut = true;
                break;
            }
            commits += 1;
            events += commit.events.len() as u64;
            let applied = projector.apply_incident_commit(commit);
            note_not_following(
                &applied,
                commit,
                &mut not_following_count,
                &mut not_following,
            );
        }
        fold_time += folding.elapsed();
        let reached = chunk_commits.last().map_or(0, |c| c.sequence);
        drop(chunk_commits);
        progress.reached(reached);
        if let Some(claim) = claim.as_deref_mut() {
            claim.renew().await?;
        }
        if options.write_during_replay {
            keys_written += write_behind(&mut projector, &mut writing, &kv, bucket).await?;
        }
        info!(
            bucket,
            reached,
            target_sequence = incidents_target,
            commits,
            fold_ms = fold_time.as_millis() as u64,
            wait_ms = wait_time.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rebuild progress"
        );
        if past_cut {
            for read in reads.drain(..) {
                read.abort();
            }
            break;
        }
    }
    if let Some(previous) = writing.take() {
        previous.await.expect("write task")?;
    }
    let written_at = started.elapsed().as_millis() as u64;
    projector.recompute_aggregates();
    let rendered = projector.take_dirty(false);
    info!(
        bucket,
        models = rendered.models.len(),
        chunks_written_ms = written_at,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "aggregates summed"
    );
    keys_written += rendered.len() as u64 + 1;
    let checkpoint = crate::wire::Checkpoint {
        generation,
        // With a cut, the checkpoint is the last commit folded, not the stream's end.
        incidents_sequence: if time_cut.is_some() {
            projector.incidents_sequence()
        } else {
            incidents_target
        },
        grids_sequence: projector.grids_sequence(),
        written_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    };
    if let Some(claim) = claim {
        claim.renew().await?;
    }
    store::write_flush(&kv, bucket, rendered, Some(checkpoint)).await?;
    Ok(RebuildReport {
        bucket: bucket.to_owned(),
        generation,
        previous_generation: None,
        incidents_sequence: checkpoint.incidents_sequence,
        grids_sequence: checkpoint.grids_sequence,
        commits,
        events,
        incidents: projector.incident_count() as u64,
        keys_written,
        elapsed_ms: started.elapsed().as_millis() as u64,
        fold_ms: fold_time.as_millis() as u64,
        read_wait_ms: wait_time.as_millis() as u64,
        chunks_written_ms: written_at,
        commits_not_following: not_following_count,
        not_following,
    })
}

/// Rebuilds every read model into generation `current + 1`, swaps the pointer to it, and
/// deletes the buckets of generations older than the one it replaced. Refused with
/// [`StoreError::RebuildClaimed`] while another rebuild runs (see [`crate::claim`]).
pub async fn rebuild(
    jetstream: &jetstream::Context,
    options: &RebuildOptions,
    progress: &dyn ProgressSink,
) -> Result<RebuildReport, RebuildError> {
    // Before touching any bucket: a rebuild pointed at the wrong server makes nothing.
    open_existing_stores(jetstream, options).await?;
    let meta = store::open_bucket(jetstream, keys::META_BUCKET, options.replicas).await?;
    let current = store::read_pointer(&meta).await?;
    // Claimed before any bucket is made: a second rebuild is refused here, having touched
    // nothing, instead of emptying the bucket this one fills.
    let (mut claim, abandoned) =
        Claim::take(&meta, current.map_or(0, |(p, _)| p.generation)).await?;
    // Another rebuild may have swapped and given its claim back between the pointer read and
    // the claim: this one would then build the generation that is now current, emptying the
    // bucket the builder and the queries use. Read the pointer again under the claim.
    let read = current.map_or(0, |(pointer, _)| pointer.generation);
    let now_current = store::read_pointer(&meta)
        .await?
        .map_or(0, |(pointer, _)| pointer.generation);
    if now_current != read {
        if let Err(error) = claim.release().await {
            warn!(%error, "the rebuild claim was not given back; the next rebuild takes it over once it is stale");
        }
        return Err(RebuildError::SwappedMeanwhile {
            read,
            swapped_to: now_current,
        });
    }
    let rebuilt = rebuild_claimed(
        jetstream, options, progress, &meta, current, abandoned, &mut claim,
    )
    .await;
    // Given back whatever happened, so a failed rebuild does not hold up the next one until
    // its claim goes stale. (Refused when the claim was taken over: it is not ours then.)
    if let Err(error) = claim.release().await {
        warn!(%error, "the rebuild claim was not given back; the next rebuild takes it over once it is stale");
    }
    rebuilt
}

async fn rebuild_claimed(
    jetstream: &jetstream::Context,
    options: &RebuildOptions,
    progress: &dyn ProgressSink,
    meta: &async_nats::jetstream::kv::Store,
    current: Option<(Pointer, u64)>,
    abandoned: Option<u64>,
    claim: &mut Claim,
) -> Result<RebuildReport, RebuildError> {
    let previous = current.map(|(pointer, _)| pointer.generation);
    let generation = claim.generation();
    // A dead rebuild's half-written bucket (its claim was taken over): never current, or it
    // would have been swapped to and be `previous`.
    if let Some(abandoned) = abandoned
        && Some(abandoned) != previous
    {
        let abandoned_bucket = keys::generation_bucket(abandoned);
        if jetstream.get_key_value(&abandoned_bucket).await.is_ok() {
            store::delete_bucket(jetstream, &abandoned_bucket).await?;
            info!(bucket = %abandoned_bucket, "bucket of an abandoned rebuild deleted");
        }
    }
    let bucket = keys::generation_bucket(generation);
    info!(
        generation,
        previous = previous.unwrap_or(0),
        "rebuilding the read models (previous 0: none)"
    );
    let mut report = build_into(
        jetstream,
        options,
        &bucket,
        generation,
        Until::End,
        progress,
        Some(&mut *claim),
    )
    .await?;
    // Still ours: a rebuild that lost its claim must not swap (its taker builds a later
    // generation, and the pointer's compare-and-set stops it anyway if it did).
    claim.renew().await?;
    store::swap_pointer(
        meta,
        Pointer {
            generation,
            swapped_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        },
        current.map(|(_, revision)| revision),
    )
    .await?;
    report.previous_generation = previous;
    // Keep the generation just replaced (readers may be mid-read, its builder moves over);
    // older ones and their consumers go.
    if let Some(previous) = previous {
        for old in 1..previous {
            let old_bucket = keys::generation_bucket(old);
            if jetstream.get_key_value(&old_bucket).await.is_ok() {
                store::delete_bucket(jetstream, &old_bucket).await?;
                info!(bucket = %old_bucket, "old generation deleted");
            }
            if let Ok(stream) = jetstream.get_stream(&options.incidents.stream_name).await {
                let _ = stream.delete_consumer(&keys::incidents_durable(old)).await;
            }
        }
    }
    report.elapsed_ms = report.elapsed_ms.max(1);
    Ok(report)
}

/// Bucket names of every as-of replay on the server (`PROJ_ASOF_*`), sorted.
pub async fn as_of_buckets(jetstream: &jetstream::Context) -> Result<Vec<String>, StoreError> {
    use futures::TryStreamExt as _;
    let prefix = format!("KV_{}", keys::as_of_bucket(""));
    let mut names: Vec<String> = jetstream
        .stream_names()
        .try_filter_map(|name| {
            let bucket = name
                .starts_with(&prefix)
                .then(|| name["KV_".len()..].to_owned());
            async move { Ok(bucket) }
        })
        .try_collect()
        .await
        .map_err(|error| StoreError::Bucket {
            bucket: keys::as_of_bucket("*"),
            action: "list",
            reason: error.to_string(),
        })?;
    names.sort();
    Ok(names)
}

/// Deletes an as-of replay's bucket, named by its label (`S120`, `T1767225600000`) or its
/// bucket name. Only `PROJ_ASOF_*` buckets: a generation the services read is never touched
/// here. Returns false when there was no such bucket.
pub async fn drop_as_of(jetstream: &jetstream::Context, name: &str) -> Result<bool, StoreError> {
    let prefix = keys::as_of_bucket("");
    let bucket = if name.starts_with(&prefix) {
        name.to_owned()
    } else {
        keys::as_of_bucket(name)
    };
    let label = &bucket[prefix.len()..];
    if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(StoreError::Bucket {
            bucket,
            action: "drop",
            reason: "not an as-of replay (labels look like S120 or T1767225600000)".to_owned(),
        });
    }
    if jetstream.get_key_value(&bucket).await.is_err() {
        return Ok(false);
    }
    store::delete_bucket(jetstream, &bucket).await?;
    info!(%bucket, "as-of replay dropped");
    Ok(true)
}

/// Replays into `PROJ_ASOF_<label>` for an audit; the current generation is untouched.
pub async fn as_of(
    jetstream: &jetstream::Context,
    options: &RebuildOptions,
    until: Until,
    progress: &dyn ProgressSink,
) -> Result<RebuildReport, RebuildError> {
    let bucket = keys::as_of_bucket(&until.label());
    build_into(jetstream, options, &bucket, 0, until, progress, None).await
}
