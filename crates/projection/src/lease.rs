//! The builder lease: any number of `wangge serve projection` instances run, exactly one of
//! them folds the streams into the read models at a time, and every one answers queries.
//!
//! WHY a lease, and why this one:
//! - Two builders on one generation would each delete and recreate the generation's INCIDENTS
//!   durable (its position is the KV checkpoint's, see `service`) and write the same keys from
//!   two folds. Folding is cheap and queries are what needs more instances, so one builder
//!   with hot standbys is the right shape, not a partition of the fold.
//! - The lease is one key, `builder`, in the meta bucket `PROJECTION` that `wangge up` already
//!   creates, so no new bucket, no new permission, no stream config change. It is taken with
//!   a create-if-absent ([`kv::Store::create`]), renewed with a revision-checked update
//!   ([`kv::Store::update`]), taken over with an update at the revision a standby saw go
//!   stale, and given back at a clean stop with a revision-checked delete.
//! - **Expiry is judged from revisions, not from timestamps or a server-side TTL.** A standby
//!   times how long the key's revision has stayed the same on its own monotonic clock, from
//!   the first time it read that revision (necessarily after the holder stored it; reads are
//!   direct gets that any replica answers, so an older revision or a missing key, a lagging
//!   replica's answer, leaves the clock running rather than restarting it); the holder
//!   times its validity from the moment it *sent* its last successful renew. Both intervals
//!   start on the same side of the write, so clock offsets between hosts do not matter (only
//!   clock rates, covered by [`LeaseTiming::margin`]). A per-message TTL would need
//!   `allow_msg_ttl` on an existing bucket and would judge expiry by the server's clock
//!   against the holder's.
//! - The pure core ([`decide`], [`settle`]) never reads a clock or does IO; the shell
//!   ([`spawn`]) reads the key, calls it, performs the one write it asks for, and publishes the
//!   [`Role`] on a watch channel for the fold loop.
//!
//! Bounds: a holder that dies (kill -9, host lost) is replaced within
//! [`LeaseTiming::takeover_bound`] (TTL + one poll: 11 s with [`BUILDER_LEASE_TTL`]) plus the
//! new builder's load of the incident states; a holder that stops cleanly gives the key back
//! and a standby takes over at its next poll.

use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::keys;

/// How long a standby waits, after first seeing the lease's current revision, before it may
/// take the lease over (the holder renews long before: every TTL / 5).
pub const BUILDER_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest TTL accepted (below it, a loaded machine's pauses make the lease flap).
pub const BUILDER_LEASE_TTL_MIN: Duration = Duration::from_secs(1);
/// Commands queued to the lease task (resign, stop).
const LEASE_COMMANDS_MAX: usize = 4;
/// Longest wait for the lease task to give the key back at a clean stop.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The lease's intervals. Only `ttl` is configured; the rest follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// A standby takes over a lease whose revision it has seen unchanged this long.
    pub ttl: Duration,
    /// The holder renews this often.
    pub renew_every: Duration,
    /// Every instance reads the key this often.
    pub poll_every: Duration,
    /// The holder stops building when its last successful renew is `ttl - margin` old, so
    /// it has stopped before any standby may take over.
    pub margin: Duration,
}

impl LeaseTiming {
    /// Renew every TTL / 5, poll every TTL / 10, stop building 3/10 of the TTL early.
    pub fn from_ttl(ttl: Duration) -> LeaseTiming {
        let ttl = ttl.max(BUILDER_LEASE_TTL_MIN);
        LeaseTiming {
            ttl,
            renew_every: ttl / 5,
            poll_every: ttl / 10,
            margin: ttl * 3 / 10,
        }
    }

    /// Longest time from the holder's last renew (so from its death) to a standby's takeover.
    pub fn takeover_bound(&self) -> Duration {
        self.ttl + self.poll_every
    }

    fn ms(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for LeaseTiming {
    fn default() -> LeaseTiming {
        LeaseTiming::from_ttl(BUILDER_LEASE_TTL)
    }
}

/// What the `builder` key holds (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The holder's token: instance name and a per-process UUID (two processes started with
    /// the same `--instance` are still told apart).
    pub holder: String,
    pub instance: String,
    /// Wall-clock times, for people reading the key (`nats kv get PROJECTION builder`); the
    /// lease logic never uses them.
    pub acquired_at_ms: i64,
    pub renewed_at_ms: i64,
    pub ttl_ms: u64,
}

/// One read of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// No value: never written (`revision` 0) or deleted at `revision`.
    Absent {
        revision: u64,
    },
    Held {
        holder: String,
        revision: u64,
    },
    /// The read failed (or the value does not decode): decide on time alone.
    Unknown,
}

/// A revision a standby saw, when it first saw it and when a read last showed it again (its
/// own clock, ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub revision: u64,
    pub since_ms: u64,
    pub confirmed_ms: u64,
}

/// What this instance believes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Standby {
        seen: Option<Seen>,
    },
    /// Holding the key at `revision` since the acquisition at `term` (a revision too); the
    /// last successful write was *sent* at `renewed_at_ms`.
    Builder {
        term: u64,
        revision: u64,
        renewed_at_ms: u64,
    },
}

/// The one write (if any) to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Wait,
    /// The key is absent: create it (fails if someone else did first).
    Create,
    /// The key stayed at `revision` for a whole TTL: update it at that revision.
    TakeOver {
        revision: u64,
    },
    Renew {
        revision: u64,
    },
    /// This instance can no longer show it holds the key: stop building now.
    StepDown,
}

/// How the write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored {
        revision: u64,
    },
    /// The revision check refused it: someone else wrote the key.
    Refused,
    /// No answer (timeout, connection): unknown whether it was stored.
    Failed,
}

/// The next state and the write to do, from what was read at `now_ms` (a monotonic clock).
pub fn decide(
    state: LeaseState,
    observed: &Observed,
    me: &str,
    now_ms: u64,
    timing: &LeaseTiming,
) -> (LeaseState, Action) {
    match state {
        LeaseState::Builder {
            term,
            revision,
            renewed_at_ms,
        } => {
            let age_ms = now_ms.saturating_sub(renewed_at_ms);
            if age_ms >= LeaseTiming::ms(timing.ttl.saturating_sub(timing.margin)) {
                return (state, Action::StepDown);
            }
            // A read may come from a replica that lags: only a newer revision than ours proves
            // someone else wrote the key.
            let revision = match observed {
                Observed::Held {
                    holder,
                    revision: seen,
                } if *seen > revision => {
                    if holder != me {
                        return (state, Action::StepDown);
                    }
                    // Our own renew was stored though its answer was lost: adopt it (still
                    // timed from the older send, the safe side).
                    *seen
                }
                Observed::Absent { revision: seen } if *seen > revision => {
                    return (state, Action::StepDown);
                }
                _ => revision,
            };
            let state = LeaseState::Builder {
                term,
                revision,
                renewed_at_ms,
            };
            if age_ms >= LeaseTiming::ms(timing.renew_every) {
                (state, Action::Renew { revision })
            } else {
                (state, Action::Wait)
            }
        }
        LeaseState::Standby { seen } => {
            // A read from a replica that lags shows an older revision than one seen before,
            // or no key at all: it proves nothing, and the clock runs on (restarting it would
            // let alternating reads keep a dead holder's lease alive for ever).
            let lagging = match (observed, seen) {
                (Observed::Held { revision, .. }, Some(seen)) => *revision < seen.revision,
                (Observed::Absent { revision }, Some(seen)) => *revision <= seen.revision,
                _ => false,
            };
            // ... unless no read has shown the seen revision for a whole TTL: then the
            // reads are the truth (the bucket was made afresh and its revisions started over),
            // and the clock starts again from them.
            let unconfirmed = seen.is_some_and(|seen| {
                now_ms.saturating_sub(seen.confirmed_ms) >= LeaseTiming::ms(timing.ttl)
            });
            match (lagging, unconfirmed) {
                (true, false) => (state, Action::Wait),
                (true, true) => standby(None, observed, now_ms, timing),
                (false, _) => standby(seen, observed, now_ms, timing),
            }
        }
    }
}

/// [`decide`] for a standby whose read is not behind what it has seen.
fn standby(
    seen: Option<Seen>,
    observed: &Observed,
    now_ms: u64,
    timing: &LeaseTiming,
) -> (LeaseState, Action) {
    let state = LeaseState::Standby { seen };
    match observed {
        Observed::Absent { .. } => (LeaseState::Standby { seen: None }, Action::Create),
        Observed::Held { revision, .. } => match seen {
            Some(seen) if seen.revision == *revision => {
                let state = LeaseState::Standby {
                    seen: Some(Seen {
                        confirmed_ms: now_ms,
                        ..seen
                    }),
                };
                let stale = now_ms.saturating_sub(seen.since_ms) >= LeaseTiming::ms(timing.ttl);
                let action = if stale {
                    Action::TakeOver {
                        revision: *revision,
                    }
                } else {
                    Action::Wait
                };
                (state, action)
            }
            _ => (
                LeaseState::Standby {
                    seen: Some(Seen {
                        revision: *revision,
                        since_ms: now_ms,
                        confirmed_ms: now_ms,
                    }),
                },
                Action::Wait,
            ),
        },
        Observed::Unknown => (state, Action::Wait),
    }
}

/// The state after `action`, sent at `sent_ms`, ended with `outcome`.
pub fn settle(state: LeaseState, action: Action, outcome: Outcome, sent_ms: u64) -> LeaseState {
    match (action, outcome) {
        (Action::Wait, _) => state,
        (Action::StepDown, _) => LeaseState::Standby { seen: None },
        (Action::Create | Action::TakeOver { .. }, Outcome::Stored { revision }) => {
            LeaseState::Builder {
                term: revision,
                revision,
                renewed_at_ms: sent_ms,
            }
        }
        (Action::Renew { .. }, Outcome::Stored { revision }) => match state {
            LeaseState::Builder { term, .. } => LeaseState::Builder {
                term,
                revision,
                renewed_at_ms: sent_ms,
            },
            standby => standby,
        },
        (Action::Create | Action::TakeOver { .. } | Action::Renew { .. }, Outcome::Refused) => {
            LeaseState::Standby { seen: None }
        }
        // Unknown: a builder keeps building until its margin runs out (then `decide` steps
        // down); a standby that may have written tries again, and a stored write of its own
        // shows up as a newer revision it must then wait out like anyone's.
        (_, Outcome::Failed) => state,
    }
}

/// What the fold loop needs to know, published by the lease task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// `Some` while this instance holds the lease.
    pub builder: Option<Term>,
    /// The holder's instance name as last read (`None`: nobody, or unknown).
    pub holder: Option<String>,
}

/// One uninterrupted holding of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// The key's revision when it was acquired: a new acquisition is a new term, even by
    /// the same instance, and the fold loop then reloads from KV.
    pub term: u64,
    /// The last instant this instance may write read models.
    pub valid_until: Instant,
}

impl Role {
    /// The term, if this instance may still write now.
    pub fn valid_term(&self, now: Instant) -> Option<u64> {
        self.builder
            .filter(|term| now < term.valid_until)
            .map(|term| term.term)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// Give the key back (if held) and go on as a standby that neither creates nor takes
    /// over the key for the given time (another instance may build meanwhile).
    Resign { hold_off: Duration },
    /// Give the key back (if held) and end.
    Stop,
}

/// The running lease task; aborted when dropped (an aborted fold loop must not leave a task
/// renewing a lease nobody uses).
#[derive(Debug)]
pub struct LeaseHandle {
    role: watch::Receiver<Role>,
    commands: mpsc::Sender<Command>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub timing: LeaseTiming,
}

impl LeaseHandle {
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Gives the key back now (the fold loop found another builder's write, or its work
    /// failed) and competes for it again only after `hold_off`.
    pub fn resign(&self, hold_off: Duration) {
        if self
            .commands
            .try_send(Command::Resign { hold_off })
            .is_err()
        {
            debug!("lease task busy or gone; resign dropped");
        }
    }

    /// Gives the key back and waits (bounded) for the task to end.
    pub async fn release(mut self) {
        let _ = self.commands.send(Command::Stop).await;
        if let Some(task) = self.task.take()
            && tokio::time::timeout(LEASE_RELEASE_TIMEOUT, task)
                .await
                .is_err()
        {
            warn!("the builder lease was not released in time; a standby takes over after the TTL");
        }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Reads the key.
pub fn observe(entry: Result<Option<kv::Entry>, String>) -> Observed {
    match entry {
        Err(_) => Observed::Unknown,
        Ok(None) => Observed::Absent { revision: 0 },
        Ok(Some(entry)) if entry.operation != kv::Operation::Put => Observed::Absent {
            revision: entry.revision,
        },
        Ok(Some(entry)) => match serde_json::from_slice::<LeaseValue>(&entry.value) {
            Ok(value) => Observed::Held {
                holder: value.holder,
                revision: entry.revision,
            },
            Err(_) => Observed::Unknown,
        },
    }
}

/// The lease as stored, for people and tools (`wangge projection status`); `None` when no
/// instance holds it (or the meta bucket does not exist yet).
pub async fn holder(
    jetstream: &async_nats::jetstream::Context,
) -> Result<Option<LeaseValue>, crate::StoreError> {
    let Ok(meta) = jetstream.get_key_value(keys::META_BUCKET).await else {
        return Ok(None);
    };
    crate::store::get_json(&meta, keys::META_BUCKET, keys::BUILDER_LEASE).await
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Starts competing for the lease in `meta` as `instance`.
pub fn spawn(meta: kv::Store, instance: &str, timing: LeaseTiming) -> LeaseHandle {
    let (role_tx, role) = watch::channel(Role {
        builder: None,
        holder: None,
    });
    let (commands, commands_rx) = mpsc::channel(LEASE_COMMANDS_MAX);
    let me = format!("{instance}/{}", uuid::Uuid::now_v7().simple());
    let task = tokio::spawn(run(
        meta,
        instance.to_owned(),
        me,
        timing,
        role_tx,
        commands_rx,
    ));
    LeaseHandle {
        role,
        commands,
        task: Some(task),
        timing,
    }
}

async fn run(
    meta: kv::Store,
    instance: String,
    me: String,
    timing: LeaseTiming,
    role_tx: watch::Sender<Role>,
    mut commands: mpsc::Receiver<Command>,
) {
    let origin = Instant::now();
    let since = |at: Instant| LeaseTiming::ms(at.duration_since(origin));
    // Every read and write is bounded by one poll interval (at least half a second), so the
    // loop keeps its rhythm when the server is slow.
    let io_timeout = timing.poll_every.max(Duration::from_millis(500));
    let mut state = LeaseState::Standby { seen: None };
    let mut acquired_at_ms = 0;
    let mut holder_instance: Option<String> = None;
    // Since when every read of the key has failed, and whether that was logged.
    let mut unreadable_since: Option<Instant> = None;
    let mut unreadable_warned = false;
    // After a resign: no create or take-over before this.
    let mut hold_off_until: Option<Instant> = None;
    let mut ticks = tokio::time::interval(timing.poll_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let command = tokio::select! {
            _ = ticks.tick() => None,
            command = commands.recv() => Some(command.unwrap_or(Command::Stop)),
        };
        if let Some(command) = command {
            if let LeaseState::Builder { revision, .. } = state {
                let released = tokio::time::timeout(
                    io_timeout,
                    meta.delete_expect_revision(keys::BUILDER_LEASE, Some(revision)),
                )
                .await;
                match released {
                    Ok(Ok(())) => info!(instance, "builder lease given back"),
                    Ok(Err(error)) => debug!(%error, "give the builder lease back"),
                    Err(_) => debug!("give the builder lease back: timed out"),
                }
            }
            state = LeaseState::Standby { seen: None };
            role_tx.send_replace(Role {
                builder: None,
                holder: None,
            });
            match command {
                Command::Stop => break,
                Command::Resign { hold_off } => {
                    hold_off_until = Some(Instant::now() + hold_off);
                    continue;
                }
            }
        }
        let read = tokio::time::timeout(io_timeout, meta.entry(keys::BUILDER_LEASE)).await;
        let entry = match read {
            Ok(Ok(entry)) => Ok(entry),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        if let Ok(Some(entry)) = &entry {
            holder_instance = serde_json::from_slice::<LeaseValue>(&entry.value)
                .ok()
                .filter(|_| entry.operation == kv::Operation::Put)
                .map(|value| value.instance);
        }
        match (&entry, unreadable_since) {
            (Err(error), None) => {
                unreadable_since = Some(Instant::now());
                debug!(%error, "read the builder lease");
            }
            (Err(error), Some(since)) if !unreadable_warned && since.elapsed() >= timing.ttl => {
                // Nobody can take over or renew a lease this instance cannot read.
                unreadable_warned = true;
                warn!(instance, %error, unreadable_for_ms = LeaseTiming::ms(since.elapsed()), "the builder lease cannot be read");
            }
            (Ok(_), Some(since)) => {
                if unreadable_warned {
                    info!(
                        instance,
                        unreadable_for_ms = LeaseTiming::ms(since.elapsed()),
                        "the builder lease can be read again"
                    );
                }
                unreadable_since = None;
                unreadable_warned = false;
            }
            _ => {}
        }
        let observed = observe(entry);
        let before = state;
        let (next, mut action) = decide(state, &observed, &me, since(Instant::now()), &timing);
        if hold_off_until.is_some_and(|until| Instant::now() < until)
            && matches!(action, Action::Create | Action::TakeOver { .. })
        {
            // Resigned after a failure: let another instance build for a while.
            action = Action::Wait;
        }
        let sent = Instant::now();
        let value = |acquired_at_ms: i64| -> bytes::Bytes {
            let value = LeaseValue {
                holder: me.clone(),
                instance: instance.clone(),
                acquired_at_ms,
                renewed_at_ms: wall_ms(),
                ttl_ms: LeaseTiming::ms(timing.ttl),
            };
            serde_json::to_vec(&value)
                .expect("lease value serialises")
                .into()
        };
        let outcome = match action {
            Action::Wait | Action::StepDown => Outcome::Failed,
            Action::Create => {
                acquired_at_ms = wall_ms();
                let written = tokio::time::timeout(
                    io_timeout,
                    meta.create(keys::BUILDER_LEASE, value(acquired_at_ms)),
                )
                .await;
                match written {
                    Ok(Ok(revision)) => Outcome::Stored { revision },
                    Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                        Outcome::Refused
                    }
                    Ok(Err(error)) => {
                        debug!(%error, "create the builder lease");
                        Outcome::Failed
                    }
                    Err(_) => Outcome::Failed,
                }
            }
            Action::TakeOver { revision } | Action::Renew { revision } => {
                if matches!(action, Action::TakeOver { .. }) {
                    acquired_at_ms = wall_ms();
                }
                let written = tokio::time::timeout(
                    io_timeout,
                    meta.update(keys::BUILDER_LEASE, value(acquired_at_ms), revision),
                )
                .await;
                match written {
                    Ok(Ok(revision)) => Outcome::Stored { revision },
                    Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        Outcome::Refused
                    }
                    Ok(Err(error)) => {
                        debug!(%error, "write the builder lease");
                        Outcome::Failed
                    }
                    Err(_) => Outcome::Failed,
                }
            }
        };
        state = settle(next, action, outcome, since(sent));
        if action != Action::Wait {
            debug!(
                instance,
                ?observed,
                ?action,
                ?outcome,
                ?state,
                "builder lease poll"
            );
        }
        match (action, outcome) {
            // A dead holder's lease this instance could not take: say so, or a projection
            // that stops building leaves no trace of why.
            (Action::TakeOver { revision }, Outcome::Failed) => warn!(
                instance,
                revision,
                holder = holder_instance.as_deref().unwrap_or("?"),
                "taking over the stale builder lease failed (no answer); trying again at the next poll"
            ),
            (Action::TakeOver { revision }, Outcome::Refused) => info!(
                instance,
                revision,
                "another instance wrote the builder lease first (a late renew or a quicker standby)"
            ),
            _ => {}
        }
        match (before, state) {
            (LeaseState::Standby { .. }, LeaseState::Builder { term, .. }) => {
                holder_instance = Some(instance.clone());
                let took_over = matches!(action, Action::TakeOver { .. });
                info!(
                    instance,
                    term,
                    took_over,
                    ttl_ms = LeaseTiming::ms(timing.ttl),
                    "this instance is now the projection builder"
                );
            }
            (LeaseState::Builder { term, .. }, LeaseState::Standby { .. }) => {
                warn!(
                    instance,
                    term,
                    ?action,
                    ?outcome,
                    "this instance is no longer the projection builder (standby)"
                );
            }
            _ => {}
        }
        let builder = match state {
            LeaseState::Builder {
                term,
                renewed_at_ms,
                ..
            } => Some(Term {
                term,
                valid_until: origin
                    + Duration::from_millis(renewed_at_ms)
                    + timing.ttl.saturating_sub(timing.margin),
            }),
            LeaseState::Standby { .. } => None,
        };
        let role = Role {
            builder,
            holder: holder_instance.clone(),
        };
        role_tx.send_if_modified(|current| {
            let changed = *current != role;
            *current = role;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    /// Runs `steps` (what each read showed, at which ms, and how the write went) from `given`
    /// and prints every state and action.
    fn check(given: LeaseState, when: &[(u64, Observed, Outcome)], expect: Expect) {
        let timing = LeaseTiming::from_ttl(Duration::from_secs(10));
        let mut state = given;
        let mut lines = Vec::new();
        for (now_ms, observed, outcome) in when {
            let (next, action) = decide(state, observed, "me", *now_ms, &timing);
            state = settle(next, action, *outcome, *now_ms);
            lines.push(format!("at {now_ms} ms: {action:?} -> {state:?}"));
        }
        expect.assert_eq(&lines.join("\n"));
    }

    fn held(holder: &str, revision: u64) -> Observed {
        Observed::Held {
            holder: holder.to_owned(),
            revision,
        }
    }

    const STANDBY: LeaseState = LeaseState::Standby { seen: None };
    /// The outcome of a step that writes nothing (ignored by `settle`).
    const NO_WRITE: Outcome = Outcome::Failed;

    fn stored(revision: u64) -> Outcome {
        Outcome::Stored { revision }
    }

    #[test]
    fn timing_follows_the_ttl() {
        let timing = LeaseTiming::default();
        expect![[r#"
            LeaseTiming { ttl: 10s, renew_every: 2s, poll_every: 1s, margin: 3s } bound 11s"#]]
        .assert_eq(&format!("{timing:?} bound {:?}", timing.takeover_bound()));
        let clamped = LeaseTiming::from_ttl(Duration::from_millis(10));
        assert_eq!(clamped.ttl, BUILDER_LEASE_TTL_MIN);
    }

    #[test]
    fn a_standby_does_not_restart_its_clock_on_a_lagging_replica() {
        // Reads are direct gets, answered by any replica: one that lags shows an older
        // revision (or none) now and then. Only a newer revision proves the holder renewed;
        // an older one must not restart the clock, or a standby whose reads alternate never
        // sees the lease go stale and nobody builds.
        check(
            STANDBY,
            &[
                (0, held("gone", 5), NO_WRITE),
                (4_000, held("gone", 3), NO_WRITE),
                (6_000, Observed::Absent { revision: 0 }, NO_WRITE),
                (8_000, held("gone", 5), NO_WRITE),
                (10_000, held("gone", 3), NO_WRITE),
                (11_000, held("gone", 5), stored(6)),
            ],
            expect![[r#"
                at 0 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 0, confirmed_ms: 0 }) }
                at 4000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 0, confirmed_ms: 0 }) }
                at 6000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 0, confirmed_ms: 0 }) }
                at 8000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 0, confirmed_ms: 8000 }) }
                at 10000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 0, confirmed_ms: 8000 }) }
                at 11000 ms: TakeOver { revision: 5 } -> Builder { term: 6, revision: 6, renewed_at_ms: 11000 }"#]],
        );
    }

    #[test]
    fn a_standby_creates_the_key_given_back_after_it_saw_it_held() {
        check(
            STANDBY,
            &[
                (0, held("gone", 5), NO_WRITE),
                (1_000, Observed::Absent { revision: 6 }, stored(7)),
            ],
            expect![[r#"
                at 0 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 0, confirmed_ms: 0 }) }
                at 1000 ms: Create -> Builder { term: 7, revision: 7, renewed_at_ms: 1000 }"#]],
        );
    }

    #[test]
    fn a_standby_believes_older_revisions_once_its_own_is_unconfirmed_for_a_ttl() {
        // The meta bucket made afresh: its revisions start over, and the standby must not
        // wait for them to climb back past the one it remembers.
        check(
            STANDBY,
            &[
                (0, held("old", 5_000), NO_WRITE),
                (1_000, held("new", 2), NO_WRITE),
                (9_000, held("new", 2), NO_WRITE),
                (11_000, held("new", 2), NO_WRITE),
                (21_000, held("new", 2), stored(3)),
            ],
            expect![[r#"
                at 0 ms: Wait -> Standby { seen: Some(Seen { revision: 5000, since_ms: 0, confirmed_ms: 0 }) }
                at 1000 ms: Wait -> Standby { seen: Some(Seen { revision: 5000, since_ms: 0, confirmed_ms: 0 }) }
                at 9000 ms: Wait -> Standby { seen: Some(Seen { revision: 5000, since_ms: 0, confirmed_ms: 0 }) }
                at 11000 ms: Wait -> Standby { seen: Some(Seen { revision: 2, since_ms: 11000, confirmed_ms: 11000 }) }
                at 21000 ms: TakeOver { revision: 2 } -> Builder { term: 3, revision: 3, renewed_at_ms: 21000 }"#]],
        );
    }

    #[test]
    fn absent_key_is_created_and_renewed() {
        check(
            STANDBY,
            &[
                (0, Observed::Absent { revision: 0 }, stored(1)),
                (1_000, held("me", 1), NO_WRITE),
                (2_000, held("me", 1), stored(2)),
                (3_000, held("me", 2), NO_WRITE),
            ],
            expect![[r#"
                at 0 ms: Create -> Builder { term: 1, revision: 1, renewed_at_ms: 0 }
                at 1000 ms: Wait -> Builder { term: 1, revision: 1, renewed_at_ms: 0 }
                at 2000 ms: Renew { revision: 1 } -> Builder { term: 1, revision: 2, renewed_at_ms: 2000 }
                at 3000 ms: Wait -> Builder { term: 1, revision: 2, renewed_at_ms: 2000 }"#]],
        );
    }

    #[test]
    fn two_standbys_racing_for_an_absent_key_one_loses() {
        check(
            STANDBY,
            &[
                (0, Observed::Absent { revision: 4 }, Outcome::Refused),
                (1_000, held("other", 5), NO_WRITE),
            ],
            expect![[r#"
                at 0 ms: Create -> Standby { seen: None }
                at 1000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 1000, confirmed_ms: 1000 }) }"#]],
        );
    }

    #[test]
    fn a_live_holder_is_never_taken_over() {
        // The holder renews every 2 s: the revision never stays put for the 10 s TTL.
        let when: Vec<_> = (0..12)
            .map(|second| (second * 1_000, held("other", 1 + second / 2), NO_WRITE))
            .collect();
        check(
            STANDBY,
            &when,
            expect![[r#"
                at 0 ms: Wait -> Standby { seen: Some(Seen { revision: 1, since_ms: 0, confirmed_ms: 0 }) }
                at 1000 ms: Wait -> Standby { seen: Some(Seen { revision: 1, since_ms: 0, confirmed_ms: 1000 }) }
                at 2000 ms: Wait -> Standby { seen: Some(Seen { revision: 2, since_ms: 2000, confirmed_ms: 2000 }) }
                at 3000 ms: Wait -> Standby { seen: Some(Seen { revision: 2, since_ms: 2000, confirmed_ms: 3000 }) }
                at 4000 ms: Wait -> Standby { seen: Some(Seen { revision: 3, since_ms: 4000, confirmed_ms: 4000 }) }
                at 5000 ms: Wait -> Standby { seen: Some(Seen { revision: 3, since_ms: 4000, confirmed_ms: 5000 }) }
                at 6000 ms: Wait -> Standby { seen: Some(Seen { revision: 4, since_ms: 6000, confirmed_ms: 6000 }) }
                at 7000 ms: Wait -> Standby { seen: Some(Seen { revision: 4, since_ms: 6000, confirmed_ms: 7000 }) }
                at 8000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 8000, confirmed_ms: 8000 }) }
                at 9000 ms: Wait -> Standby { seen: Some(Seen { revision: 5, since_ms: 8000, confirmed_ms: 9000 }) }
                at 10000 ms: Wait -> Standby { seen: Some(Seen { revision: 6, since_ms: 10000, confirmed_ms: 10000 }) }
                at 11000 ms: Wait -> Standby { seen: Some(Seen { revision: 6, since_ms: 10000, confirmed_ms: 11000 }) }"#]],
        );
    }

    #[test]
    fn a_dead_holder_is_taken_over_one_ttl_after_its_last_revision_was_first_seen() {
        check(
            STANDBY,
            &[
                (500, held("dead", 7), NO_WRITE),
                (1_500, Observed::Unknown, NO_WRITE),
                (9_500, held("dead", 7), NO_WRITE),
                (10_500, held("dead", 7), stored(8)),
            ],
            expect![[r#"
                at 500 ms: Wait -> Standby { seen: Some(Seen { revision: 7, since_ms: 500, confirmed_ms: 500 }) }
                at 1500 ms: Wait -> Standby { seen: Some(Seen { revision: 7, since_ms: 500, confirmed_ms: 500 }) }
                at 9500 ms: Wait -> Standby { seen: Some(Seen { revision: 7, since_ms: 500, confirmed_ms: 9500 }) }
                at 10500 ms: TakeOver { revision: 7 } -> Builder { term: 8, revision: 8, renewed_at_ms: 10500 }"#]],
        );
    }

    #[test]
    fn a_takeover_refused_by_a_late_renew_goes_back_to_waiting() {
        check(
            LeaseState::Standby {
                seen: Some(Seen {
                    revision: 7,
                    since_ms: 0,
                    confirmed_ms: 9_000,
                }),
            },
            &[
                (10_000, held("slow", 7), Outcome::Refused),
                (11_000, held("slow", 8), NO_WRITE),
            ],
            expect![[r#"
                at 10000 ms: TakeOver { revision: 7 } -> Standby { seen: None }
                at 11000 ms: Wait -> Standby { seen: Some(Seen { revision: 8, since_ms: 11000, confirmed_ms: 11000 }) }"#]],
        );
    }

    #[test]
    fn a_holder_that_cannot_renew_stops_building_before_anyone_may_take_over() {
        // Renews fail from 2 s on; at 7 s (TTL 10 s - margin 3 s) it steps down. A standby
        // that read revision 1 at 0.5 s at the earliest may take over at 10.5 s.
        check(
            LeaseState::Builder {
                term: 1,
                revision: 1,
                renewed_at_ms: 0,
            },
            &[
                (2_000, Observed::Unknown, Outcome::Failed),
                (4_000, Observed::Unknown, Outcome::Failed),
                (6_000, Observed::Unknown, Outcome::Failed),
                (6_999, Observed::Unknown, Outcome::Failed),
                (7_000, held("me", 1), NO_WRITE),
            ],
            expect![[r#"
                at 2000 ms: Renew { revision: 1 } -> Builder { term: 1, revision: 1, renewed_at_ms: 0 }
                at 4000 ms: Renew { revision: 1 } -> Builder { term: 1, revision: 1, renewed_at_ms: 0 }
                at 6000 ms: Renew { revision: 1 } -> Builder { term: 1, revision: 1, renewed_at_ms: 0 }
                at 6999 ms: Renew { revision: 1 } -> Builder { term: 1, revision: 1, renewed_at_ms: 0 }
                at 7000 ms: StepDown -> Standby { seen: None }"#]],
        );
    }

    #[test]
    fn a_holder_steps_down_when_someone_else_wrote_a_newer_revision() {
        let builder = LeaseState::Builder {
            term: 3,
            revision: 5,
            renewed_at_ms: 1_000,
        };
        check(
            builder,
            &[(1_500, held("other", 6), NO_WRITE)],
            expect![[r#"at 1500 ms: StepDown -> Standby { seen: None }"#]],
        );
        check(
            builder,
            &[(1_500, Observed::Absent { revision: 6 }, NO_WRITE)],
            expect![[r#"at 1500 ms: StepDown -> Standby { seen: None }"#]],
        );
        check(
            builder,
            &[(3_000, Observed::Absent { revision: 0 }, Outcome::Refused)],
            expect![[r#"at 3000 ms: Renew { revision: 5 } -> Standby { seen: None }"#]],
        );
    }

    #[test]
    fn a_holder_ignores_a_lagging_replica_and_adopts_its_own_lost_renew() {
        check(
            LeaseState::Builder {
                term: 3,
                revision: 5,
                renewed_at_ms: 1_000,
            },
            &[
                (2_000, held("other", 2), NO_WRITE),
                (2_500, held("me", 6), NO_WRITE),
                (3_000, held("me", 6), stored(7)),
            ],
            expect![[r#"
                at 2000 ms: Wait -> Builder { term: 3, revision: 5, renewed_at_ms: 1000 }
                at 2500 ms: Wait -> Builder { term: 3, revision: 6, renewed_at_ms: 1000 }
                at 3000 ms: Renew { revision: 6 } -> Builder { term: 3, revision: 7, renewed_at_ms: 3000 }"#]],
        );
    }

    #[test]
    fn a_term_is_valid_until_its_margin() {
        let now = Instant::now();
        let role = Role {
            builder: Some(Term {
                term: 4,
                valid_until: now + Duration::from_secs(1),
            }),
            holder: Some("a".to_owned()),
        };
        assert_eq!(role.valid_term(now), Some(4));
        assert_eq!(role.valid_term(now + Duration::from_secs(1)), None);
    }
}
