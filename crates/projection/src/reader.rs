//! Typed reads of one generation of the read models, for the query API, the demo and tests.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::de::DeserializeOwned;

use crate::fold::StoredIncident;
use crate::keys;
use crate::store::{self, StoreError};
use crate::wire::{
    AreaStats, Checkpoint, CommunityCompliance, DeadlineCompliance, DepartmentBoard, IncidentView,
    Scorecard, Totals, WhistleCount,
};

/// Poll interval of [`ReadModels::wait_for`].
const WAIT_POLL: Duration = Duration::from_millis(20);

/// One generation's bucket, read through KV gets (values are small; lists use one bulk load).
#[derive(Debug, Clone)]
pub struct ReadModels {
    jetstream: jetstream::Context,
    generation: u64,
    bucket: String,
    store: kv::Store,
}

impl ReadModels {
    /// Opens generation `generation` (it must exist).
    pub async fn open(
        jetstream: &jetstream::Context,
        generation: u64,
    ) -> Result<ReadModels, StoreError> {
        let bucket = keys::generation_bucket(generation);
        ReadModels::open_bucket(jetstream, generation, &bucket).await
    }

    /// Opens a bucket by name (e.g. an as-of replay's).
    pub async fn open_bucket(
        jetstream: &jetstream::Context,
        generation: u64,
        bucket: &str,
    ) -> Result<ReadModels, StoreError> {
        let store = store::existing_bucket(jetstream, bucket).await?;
        Ok(ReadModels {
            jetstream: jetstream.clone(),
            generation,
            bucket: bucket.to_owned(),
            store,
        })
    }

    /// Opens the generation the meta bucket points at; `None` when no builder ever ran.
    /// `None` when there is no generation yet (no meta bucket, or no pointer in it); any
    /// other failure (a permission, a timeout) is an error, never "nothing yet".
    pub async fn current(jetstream: &jetstream::Context) -> Result<Option<ReadModels>, StoreError> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::context::GetStreamErrorKind;
        let unreadable = |reason: String| StoreError::Bucket {
            bucket: keys::META_BUCKET.to_owned(),
            action: "open",
            reason,
        };
        match jetstream
            .get_stream(format!("KV_{}", keys::META_BUCKET))
            .await
        {
            Ok(_) => {}
            Err(error)
                if matches!(error.kind(), GetStreamErrorKind::JetStream(ref source)
                    if source.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(unreadable(error.to_string())),
        }
        let meta = jetstream
            .get_key_value(keys::META_BUCKET)
            .await
            .map_err(|error| unreadable(error.to_string()))?;
        match store::read_pointer(&meta).await? {
            Some((pointer, _)) => Ok(Some(ReadModels::open(jetstream, pointer.generation).await?)),
            None => Ok(None),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        store::get_json(&self.store, &self.bucket, key).await
    }

    async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        store::load_prefix(&self.jetstream, &self.bucket, prefix)
            .await?
            .into_iter()
            .map(|(key, value)| {
                serde_json::from_slice(&value).map_err(|error| StoreError::Decode {
                    bucket: self.bucket.clone(),
                    key,
                    reason: error.to_string(),
                })
            })
            .collect()
    }

    /// Where the generation stands (default: nothing folded yet).
    pub async fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        Ok(self.get(keys::CHECKPOINT).await?.unwrap_or(Checkpoint {
            generation: self.generation,
            ..Checkpoint::default()
        }))
    }

    /// Waits until the checkpoint covers INCIDENTS `incidents_sequence` (and GRIDS
    /// `grids_sequence`); returns the checkpoint, or the last one seen after `timeout`.
    pub async fn wait_for(
        &self,
        incidents_sequence: u64,
        grids_sequence: u64,
        timeout: Duration,
    ) -> Result<Checkpoint, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let checkpoint = self.checkpoint().await?;
            let reached = checkpoint.incidents_sequence >= incidents_sequence
                && checkpoint.grids_sequence >= grids_sequence;
            if reached || tokio::time::Instant::now() >= deadline {
                return Ok(checkpoint);
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// City-wide figures (zeros before the first flush).
    pub async fn totals(&self) -> Result<Totals, StoreError> {
        Ok(self.get(keys::TOTALS).await?.unwrap_or(Totals {
            sequence: 0,
            incidents: 0,
            open: 0,
            by_status: BTreeMap::new(),
            whistles: Vec::new(),
            deadlines: DeadlineCompliance::default(),
            tally: Default::default(),
        }))
    }

    /// Incidents by status name (`dispatched`, `closed`, ...).
    pub async fn incident_counts_by_status(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        Ok(self.totals().await?.by_status)
    }

    /// Whistles by kind and level (blown and escalated).
    pub async fn whistles_by_kind_and_level(&self) -> Result<Vec<WhistleCount>, StoreError> {
        Ok(self.totals().await?.whistles)
    }

    /// Response, resolution and report deadlines: on time, late, missed.
    pub async fn deadline_compliance(&self) -> Result<DeadlineCompliance, StoreError> {
        Ok(self.totals().await?.deadlines)
    }

    pub async fn incident(&self, incident_id: &str) -> Result<Option<IncidentView>, StoreError> {
        if !keys::is_token(incident_id) {
            return Ok(None);
        }
        let stored: Option<StoredIncident> = self.get(&keys::incident(incident_id)).await?;
        Ok(stored.map(|stored| stored.view))
    }

    pub async fn board(&self, department: &str) -> Result<Option<DepartmentBoard>, StoreError> {
        if !keys::is_token(department) {
            return Ok(None);
        }
        self.get(&keys::board(department)).await
    }

    /// Every department's board.
    pub async fn boards(&self) -> Result<Vec<DepartmentBoard>, StoreError> {
        self.list(keys::BOARD_PREFIX).await
    }

    /// One area: `level` is `grid`, `community` or `street`.
    pub async fn area(&self, level: &str, code: &str) -> Result<Option<AreaStats>, StoreError> {
        if !keys::is_token(level) || !keys::is_token(code) {
            return Ok(None);
        }
        self.get(&keys::area(level, code)).await
    }

    /// Every area of a level, by code.
    pub async fn areas(&self, level: &str) -> Result<Vec<AreaStats>, StoreError> {
        if !keys::is_token(level) {
            return Ok(Vec::new());
        }
        self.list(&format!("{}.{level}", keys::AREA_PREFIX)).await
    }

    pub async fn scorecard(&self, kind: &str, id: &str) -> Result<Option<Scorecard>, StoreError> {
        if !keys::is_token(kind) || !keys::is_token(id) {
            return Ok(None);
        }
        self.get(&keys::scorecard(kind, id)).await
    }

    /// Every scorecard of `kind` (`department` or `street`), by id.
    pub async fn scorecards(&self, kind: &str) -> Result<Vec<Scorecard>, StoreError> {
        if !keys::is_token(kind) {
            return Ok(Vec::new());
        }
        self.list(&format!("{}.{kind}", keys::SCORECARD_PREFIX))
            .await
    }

    pub async fn department_scorecards(&self) -> Result<Vec<Scorecard>, StoreError> {
        self.scorecards("department").await
    }

    pub async fn street_scorecards(&self) -> Result<Vec<Scorecard>, StoreError> {
        self.scorecards("street").await
    }

    pub async fn compliance(
        &self,
        community_id: &str,
    ) -> Result<Option<CommunityCompliance>, StoreError> {
        if !keys::is_token(community_id) {
            return Ok(None);
        }
        self.get(&keys::compliance(community_id)).await
    }

    pub async fn compliance_all(&self) -> Result<Vec<CommunityCompliance>, StoreError> {
        self.list(keys::COMPLIANCE_PREFIX).await
    }

    /// Every value of the generation as JSON, by key; incident values as their public view
    /// (tests compare this with a pure fold).
    pub async fn dump(&self) -> Result<BTreeMap<String, serde_json::Value>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in store::load_prefix(&self.jetstream, &self.bucket, "").await? {
            let decode = |reason: String| StoreError::Decode {
                bucket: self.bucket.clone(),
                key: key.clone(),
                reason,
            };
            if key == keys::CHECKPOINT {
                continue;
            }
            let json = if key.starts_with(&format!("{}.", keys::INCIDENT_PREFIX)) {
                let stored: StoredIncident =
                    serde_json::from_slice(&value).map_err(|e| decode(e.to_string()))?;
                serde_json::to_value(stored.view).map_err(|e| decode(e.to_string()))?
            } else {
                serde_json::from_slice(&value).map_err(|e| decode(e.to_string()))?
            };
            out.insert(key, json);
        }
        Ok(out)
    }
}
