//! Bucket and key names. One KV bucket per generation (`PROJ_G<n>`) holds every read model;
//! the meta bucket `PROJECTION` names the current generation under `current`.

/// The meta bucket: the pointer to the current generation.
pub const META_BUCKET: &str = "PROJECTION";
/// Key of the [`crate::store::Pointer`] in [`META_BUCKET`].
pub const CURRENT: &str = "current";
/// Key of the builder lease ([`crate::lease::LeaseValue`]) in [`META_BUCKET`].
pub const BUILDER_LEASE: &str = "builder";
/// Key of the running rebuild's claim ([`crate::claim::RebuildClaim`]) in [`META_BUCKET`].
pub const REBUILD_CLAIM: &str = "rebuild";
/// Key of the [`crate::wire::Checkpoint`] in a generation bucket.
pub const CHECKPOINT: &str = "checkpoint";
/// Key of the city-wide [`crate::wire::Totals`].
pub const TOTALS: &str = "totals";
pub const INCIDENT_PREFIX: &str = "incident";
pub const BOARD_PREFIX: &str = "board";
pub const AREA_PREFIX: &str = "area";
pub const SCORECARD_PREFIX: &str = "scorecard";
pub const COMPLIANCE_PREFIX: &str = "compliance";

/// The bucket of generation `generation`.
pub fn generation_bucket(generation: u64) -> String {
    format!("PROJ_G{generation}")
}

/// The bucket of an as-of replay (`label`: `S<sequence>` or `T<unix ms>`).
pub fn as_of_bucket(label: &str) -> String {
    format!("PROJ_ASOF_{label}")
}

/// Durable consumer of a generation on INCIDENTS.
pub fn incidents_durable(generation: u64) -> String {
    format!("projection-g{generation}")
}

pub fn incident(incident_id: &str) -> String {
    format!("{INCIDENT_PREFIX}.{incident_id}")
}

pub fn board(department: &str) -> String {
    format!("{BOARD_PREFIX}.{department}")
}

pub fn area(level: &str, code: &str) -> String {
    format!("{AREA_PREFIX}.{level}.{code}")
}

pub fn scorecard(kind: &str, id: &str) -> String {
    format!("{SCORECARD_PREFIX}.{kind}.{id}")
}

pub fn compliance(community_id: &str) -> String {
    format!("{COMPLIANCE_PREFIX}.{community_id}")
}

/// Whether `text` is safe as one KV key token (`[A-Za-z0-9_-]`, at most 128 bytes).
pub fn is_token(text: &str) -> bool {
    const TOKEN_BYTES_MAX: usize = 128;
    !text.is_empty()
        && text.len() <= TOKEN_BYTES_MAX
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
