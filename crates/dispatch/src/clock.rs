//! Where `now` comes from. The domain never reads a clock; this is the only place the dispatch
//! shell does, so tests can run the whistle ladder in virtual or compressed time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use domain::Timestamp;

/// The service's time source.
#[derive(Debug, Clone)]
pub enum TimeSource {
    /// The system's wall clock.
    System,
    /// Compressed time: `origin_ms + (wall_now - origin_ms) * scale`. Every process given the
    /// same origin and scale agrees on `now`, so a restarted instance continues the same
    /// timeline (used by tests that kill and restart the service binary).
    Scaled { origin_ms: i64, scale: u32 },
    /// Virtual time moved by the test ([`ManualTime::set`]).
    Manual(ManualTime),
}

impl TimeSource {
    pub fn now(&self) -> Timestamp {
        match self {
            TimeSource::System => Timestamp(wall_ms()),
            TimeSource::Scaled { origin_ms, scale } => {
                Timestamp::compressed(wall_ms(), *origin_ms, *scale)
            }
            TimeSource::Manual(manual) => manual.now(),
        }
    }

    /// Wall milliseconds the service waits for `virtual_ms` of this source's time to pass.
    pub fn wall_ms_for(&self, virtual_ms: i64) -> i64 {
        match self {
            TimeSource::System | TimeSource::Manual(_) => virtual_ms,
            TimeSource::Scaled { scale, .. } => virtual_ms / i64::from((*scale).max(1)),
        }
    }
}

/// A clock the test moves by hand; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualTime(Arc<AtomicI64>);

impl ManualTime {
    pub fn new(start: Timestamp) -> ManualTime {
        ManualTime(Arc::new(AtomicI64::new(start.0)))
    }

    pub fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }

    pub fn set(&self, now: Timestamp) {
        self.0.store(now.0, Ordering::SeqCst);
    }

    pub fn advance_minutes(&self, minutes: u32) {
        self.0.fetch_add(
            i64::from(minutes) * domain::ids::MINUTE_MS,
            Ordering::SeqCst,
        );
    }
}

/// Milliseconds since the Unix epoch on the system clock.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
