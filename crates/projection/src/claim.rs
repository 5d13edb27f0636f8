//! The rebuild claim: one `projection rebuild` at a time.
//!
//! WHY: a rebuild writes generation `current + 1` and then swaps the pointer. Two rebuilds
//! started together both chose the same generation, and the second emptied (deleted and
//! made again) the bucket the first was filling; the first then swapped the pointer to a
//! half-written bucket, and the second lost the swap with `SwapConflict`. So before it makes
//! any bucket, a rebuild claims its generation with a create-if-absent of the key `rebuild`
//! in the meta bucket `PROJECTION`: the second finds the key and is refused at once,
//! touching nothing.
//!
//! A rebuild killed on the way leaves its claim behind. The holder renews the claim (a
//! revision-checked update) after every chunk it folds, so a claim not renewed for
//! [`REBUILD_CLAIM_STALE_AFTER`] belongs to a rebuild that is gone, and the next rebuild
//! takes it over (an update at the revision it read: of two racing takers one wins). The
//! taker builds a generation after the abandoned one, and deletes the abandoned bucket, so
//! that even a holder that was only frozen never writes into the taker's bucket: its next
//! renewal finds the claim changed and it stops, and its swap (if it got that far) would
//! lose the pointer's compare-and-set. The age is judged by wall clocks of two hosts;
//! the bound is minutes, clock offsets between hosts are far smaller.

use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::StoreError;

/// A claim not renewed for this long is a dead rebuild's, and may be taken over. The holder
/// renews it after every chunk it folds (seconds apart) and before the swap.
pub const REBUILD_CLAIM_STALE_AFTER: Duration = Duration::from_secs(10 * 60);
/// Reads and writes of the claim when other rebuilds keep changing it in between.
const CLAIM_ATTEMPTS_MAX: usize = 3;

/// What the meta bucket's `rebuild` key holds while a rebuild runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildClaim {
    /// The generation the rebuild builds.
    pub generation: u64,
    /// Who: process id and host, for the message that refuses a second rebuild.
    pub holder: String,
    pub claimed_at_ms: i64,
    pub renewed_at_ms: i64,
}

/// The one write [`decide`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimStep {
    /// No claim: create the key (refused if another rebuild created it first).
    Create(RebuildClaim),
    /// A stale claim at `revision`: overwrite it there (refused if it changed), and delete
    /// the bucket of its generation `abandoned` when that is not the current generation.
    TakeOver {
        claim: RebuildClaim,
        revision: u64,
        abandoned: u64,
    },
}

/// What to write to claim the next generation, given the claim found (with its revision)
/// and the current generation; refused while another rebuild's claim is fresh.
pub fn decide(
    found: Option<(&RebuildClaim, u64)>,
    current_generation: u64,
    holder: &str,
    now_ms: i64,
) -> Result<ClaimStep, StoreError> {
    let claim = |generation| RebuildClaim {
        generation,
        holder: holder.to_owned(),
        claimed_at_ms: now_ms,
        renewed_at_ms: now_ms,
    };
    let Some((found, revision)) = found else {
        return Ok(ClaimStep::Create(claim(current_generation + 1)));
    };
    let silent_ms = now_ms.saturating_sub(found.renewed_at_ms);
    if silent_ms < REBUILD_CLAIM_STALE_AFTER.as_millis() as i64 {
        return Err(StoreError::RebuildClaimed {
            generation: found.generation,
            holder: found.holder.clone(),
            silent_s: silent_ms.max(0) / 1000,
        });
    }
    // After the abandoned generation, so that its holder, if it still runs, never shares a
    // bucket with this rebuild.
    Ok(ClaimStep::TakeOver {
        claim: claim(current_generation.max(found.generation) + 1),
        revision,
        abandoned: found.generation,
    })
}

/// A claim this process holds: renew it while building, release it when done.
#[derive(Debug)]
pub struct Claim {
    meta: kv::Store,
    claim: RebuildClaim,
    revision: u64,
}

impl Claim {
    /// Claims the generation after `current_generation` for this process, or explains
    /// which rebuild holds it. Returns the claim and, after a takeover, the abandoned
    /// generation whose bucket the caller deletes (when it is not the current one).
    pub async fn take(
        meta: &kv::Store,
        current_generation: u64,
    ) -> Result<(Claim, Option<u64>), StoreError> {
        let holder = holder();
        let mut attempt = 1;
        loop {
            let found = read(meta).await?;
            let step = decide(
                found.as_ref().map(|(claim, revision)| (claim, *revision)),
                current_generation,
                &holder,
                now_ms(),
            )?;
            // A refused write means another rebuild claimed between the read and the write:
            // read again, and the refusal names it.
            let (written, abandoned) = match &step {
                ClaimStep::Create(claim) => (
                    meta.create(keys::REBUILD_CLAIM, encode(claim))
                        .await
                        .map_err(|error| match error.kind() {
                            kv::CreateErrorKind::AlreadyExists => None,
                            _ => Some(claim_error("create")(error.to_string())),
                        }),
                    None,
                ),
                ClaimStep::TakeOver {
                    claim,
                    revision,
                    abandoned,
                } => (
                    meta.update(keys::REBUILD_CLAIM, encode(claim), *revision)
                        .await
                        .map_err(|error| match error.kind() {
                            kv::UpdateErrorKind::WrongLastRevision => None,
                            _ => Some(claim_error("take over")(error.to_string())),
                        }),
                    Some(*abandoned),
                ),
            };
            let claim = match step {
                ClaimStep::Create(claim) | ClaimStep::TakeOver { claim, .. } => claim,
            };
            match written {
                Ok(revision) => {
                    let meta = meta.clone();
                    return Ok((
                        Claim {
                            meta,
                            claim,
                            revision,
                        },
                        abandoned,
                    ));
                }
                Err(Some(error)) => return Err(error),
                Err(None) if attempt < CLAIM_ATTEMPTS_MAX => attempt += 1,
                Err(None) => {
                    return Err(claim_error("claim")(format!(
                        "another rebuild changed the claim {CLAIM_ATTEMPTS_MAX} times while \
                         this one tried to take it"
                    )));
                }
            }
        }
    }

    /// The generation this claim builds.
    pub fn generation(&self) -> u64 {
        self.claim.generation
    }

    /// Marks the claim alive; fails with [`StoreError::RebuildClaimLost`] when another
    /// rebuild took it over (this one was silent too long): the caller must stop.
    pub async fn renew(&mut self) -> Result<(), StoreError> {
        self.claim.renewed_at_ms = now_ms();
        self.revision = self
            .meta
            .update(keys::REBUILD_CLAIM, encode(&self.claim), self.revision)
            .await
            .map_err(|error| match error.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::RebuildClaimLost {
                    generation: self.claim.generation,
                },
                _ => claim_error("renew")(error.to_string()),
            })?;
        Ok(())
    }

    /// Gives the claim back (only if it is still this one's), so the next rebuild need not
    /// wait for it to go stale.
    pub async fn release(self) -> Result<(), StoreError> {
        self.meta
            .delete_expect_revision(keys::REBUILD_CLAIM, Some(self.revision))
            .await
            .map_err(|error| claim_error("release")(error.to_string()))
    }
}

/// The claim stored now, with its revision; `None` when there is none.
async fn read(meta: &kv::Store) -> Result<Option<(RebuildClaim, u64)>, StoreError> {
    let entry = meta
        .entry(keys::REBUILD_CLAIM)
        .await
        .map_err(|error| claim_error("read")(error.to_string()))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    let claim = serde_json::from_slice(&entry.value).map_err(|error| StoreError::Decode {
        bucket: keys::META_BUCKET.to_owned(),
        key: keys::REBUILD_CLAIM.to_owned(),
        reason: format!(
            "{error} (if no rebuild runs, delete the key: `nats kv del {} {}`)",
            keys::META_BUCKET,
            keys::REBUILD_CLAIM
        ),
    })?;
    Ok(Some((claim, entry.revision)))
}

fn claim_error(action: &'static str) -> impl Fn(String) -> StoreError {
    move |reason| StoreError::Bucket {
        bucket: keys::META_BUCKET.to_owned(),
        action,
        reason: format!("rebuild claim: {reason}"),
    }
}

fn encode(claim: &RebuildClaim) -> bytes::Bytes {
    serde_json::to_vec(claim)
        .expect("a claim serialises")
        .into()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// "pid <pid> on <host>", for people reading the refusal.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".to_owned());
    format!("pid {} on {host}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    const NOW: i64 = 1_800_000_000_000;
    const STALE_MS: i64 = REBUILD_CLAIM_STALE_AFTER.as_millis() as i64;

    /// What a rebuild at `NOW` does, given the claim found (renewed at the given time, with
    /// revision 7) and the current generation.
    fn check(found: Option<(u64, i64)>, current_generation: u64, expected: Expect) {
        let found = found.map(|(generation, renewed_at_ms)| RebuildClaim {
            generation,
            holder: "pid 1 on elsewhere".to_owned(),
            claimed_at_ms: renewed_at_ms - 60_000,
            renewed_at_ms,
        });
        let step = decide(
            found.as_ref().map(|claim| (claim, 7)),
            current_generation,
            "pid 2 on here",
            NOW,
        );
        let shown = match step {
            Ok(step) => format!("{step:?}"),
            Err(error) => format!("refused: {error}"),
        };
        expected.assert_eq(&shown);
    }

    #[test]
    fn none_found_claims_the_next_generation() {
        check(
            None,
            3,
            expect![[
                r#"Create(RebuildClaim { generation: 4, holder: "pid 2 on here", claimed_at_ms: 1800000000000, renewed_at_ms: 1800000000000 })"#
            ]],
        );
    }

    #[test]
    fn a_live_claim_refuses_a_second_rebuild() {
        check(
            Some((4, NOW - 5_000)),
            3,
            expect![[
                r#"refused: another rebuild (pid 1 on elsewhere) is building generation 4 (claim renewed 5 s ago, key `rebuild` of bucket PROJECTION); a second one would empty its bucket. Wait for it; if it died, its claim is taken over once it has not been renewed for 600 s"#
            ]],
        );
        // Just inside the bound, and a claim renewed "in the future" by a faster clock.
        check(
            Some((4, NOW - STALE_MS + 1)),
            3,
            expect![[
                r#"refused: another rebuild (pid 1 on elsewhere) is building generation 4 (claim renewed 599 s ago, key `rebuild` of bucket PROJECTION); a second one would empty its bucket. Wait for it; if it died, its claim is taken over once it has not been renewed for 600 s"#
            ]],
        );
        check(
            Some((4, NOW + 30_000)),
            3,
            expect![[
                r#"refused: another rebuild (pid 1 on elsewhere) is building generation 4 (claim renewed 0 s ago, key `rebuild` of bucket PROJECTION); a second one would empty its bucket. Wait for it; if it died, its claim is taken over once it has not been renewed for 600 s"#
            ]],
        );
    }

    #[test]
    fn a_stale_claim_is_taken_over_for_a_generation_after_it() {
        check(
            Some((4, NOW - STALE_MS)),
            3,
            expect![[
                r#"TakeOver { claim: RebuildClaim { generation: 5, holder: "pid 2 on here", claimed_at_ms: 1800000000000, renewed_at_ms: 1800000000000 }, revision: 7, abandoned: 4 }"#
            ]],
        );
        // Its rebuild swapped and died before giving the claim back: the next generation.
        check(
            Some((4, NOW - 2 * STALE_MS)),
            4,
            expect![[
                r#"TakeOver { claim: RebuildClaim { generation: 5, holder: "pid 2 on here", claimed_at_ms: 1800000000000, renewed_at_ms: 1800000000000 }, revision: 7, abandoned: 4 }"#
            ]],
        );
    }
}
