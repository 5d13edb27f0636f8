//! Read models against a fold of the log: the check after a crash, a builder takeover or a
//! rebuild. Incident views must match exactly. An aggregate's `sequence` only says how far the
//! stream had been folded when the aggregate was last written (one that no later commit touched
//! keeps an older one), so it is left out.

use std::collections::BTreeMap;

use eventstore::{EventStore, LoadError, ReplayRange};
use serde_json::Value;

use crate::fold::Projector;
use crate::wire::ScoreWeights;

/// Key prefix of the per-incident views, compared whole.
const INCIDENT_PREFIX: &str = "incident.";

/// A read-model value as it must equal the fold's: without `sequence` unless it is an incident
/// view.
pub fn comparable_value(key: &str, value: &Value) -> Value {
    let mut value = value.clone();
    if !key.starts_with(INCIDENT_PREFIX)
        && let Some(object) = value.as_object_mut()
    {
        object.remove("sequence");
    }
    value
}

/// Every model as [`comparable_value`] makes it.
pub fn comparable(models: BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    models
        .into_iter()
        .map(|(key, value)| {
            let value = comparable_value(&key, &value);
            (key, value)
        })
        .collect()
}

/// Keys whose comparable values differ, then keys only `right` has.
pub fn differing_keys(
    left: &BTreeMap<String, Value>,
    right: &BTreeMap<String, Value>,
) -> Vec<String> {
    let mut keys: Vec<String> = left
        .iter()
        .filter(|(key, value)| {
            right.get(*key).map(|other| comparable_value(key, other))
                != Some(comparable_value(key, value))
        })
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(right.keys().filter(|key| !left.contains_key(*key)).cloned());
    keys
}

/// The models a pure fold of INCIDENTS gives (default weights, no GRIDS), up to
/// `until_sequence` or to the end: what a builder's KV must equal.
pub async fn fold_of_incidents(
    store: &EventStore<codecs::IncidentCodec>,
    until_sequence: Option<u64>,
) -> Result<BTreeMap<String, Value>, LoadError> {
    let mut projector = Projector::new(ScoreWeights::default(), None, false);
    store
        .replay(
            ReplayRange {
                until_sequence,
                ..ReplayRange::default()
            },
            |commit| {
                projector.apply_incident_commit(&commit);
            },
        )
        .await?;
    projector.recompute_aggregates();
    Ok(projector.render_all())
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use serde_json::json;

    use super::*;

    fn check(left: Value, right: Value, expect: Expect) {
        let models = |value: Value| -> BTreeMap<String, Value> {
            serde_json::from_value(value).unwrap_or_default()
        };
        expect.assert_debug_eq(&differing_keys(&models(left), &models(right)));
    }

    #[test]
    fn sequence_counts_for_incidents_only() {
        check(
            json!({"totals": {"incidents": 3, "sequence": 7}, "incident.a": {"status": "filed", "sequence": 5}}),
            json!({"totals": {"incidents": 3, "sequence": 9}, "incident.a": {"status": "filed", "sequence": 6}}),
            expect![[r#"
                [
                    "incident.a",
                ]
            "#]],
        );
    }

    #[test]
    fn values_and_missing_keys_on_either_side() {
        check(
            json!({"totals": {"incidents": 3}, "grid.1": {"open": 1}}),
            json!({"totals": {"incidents": 4}, "street.9": {"open": 1}}),
            expect![[r#"
                [
                    "grid.1",
                    "totals",
                    "street.9",
                ]
            "#]],
        );
    }
}
