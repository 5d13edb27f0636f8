//! Property test: arbitrary bytes, arbitrary JSON and mutated submissions fed through the
//! decoder and the core never panic and always end in a receipt (filed, merged or rejected).

use domain::{Policy, Timestamp};
use intake::core::{Core, CoreConfig, Locate, Located};
use intake::decode::{Limits, Place, decode_submission};
use intake::wire::Receipt;
use proptest::prelude::*;
use serde_json::{Value, json};

static POLICY: std::sync::LazyLock<Policy> =
    std::sync::LazyLock::new(|| Policy::embedded("sanming").expect("policy"));

/// Serves one grid over a 0.01° box around Sanming, unserved elsewhere.
struct BoxLocator;

impl Locate for BoxLocator {
    fn locate(&self, place: &Place) -> Located {
        match place {
            Place::Point { lon, lat }
                if (117.62..117.64).contains(lon) && (26.25..26.27).contains(lat) =>
            {
                Located::Grid {
                    grid: "350402001001003".parse().expect("grid code"),
                    point: Some((*lon, *lat)),
                }
            }
            Place::Point { .. } => Located::Outside,
            Place::Building(id) => Located::UnknownBuilding(format!("building {id:?} is unknown")),
        }
    }
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("submission_id".to_owned()),
                    Just("kind".to_owned()),
                    Just("category".to_owned()),
                    Just("location".to_owned()),
                    Just("description".to_owned()),
                    Just("media".to_owned()),
                    Just("channel".to_owned()),
                    Just("reporter_id".to_owned()),
                    Just("occurred_at".to_owned()),
                    Just("point".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..10,
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn valid(id: &str) -> Value {
    json!({
        "submission_id": id,
        "kind": "complaint",
        "category": "0101",
        "location": {"point": {"lon": 117.63, "lat": 26.26}},
        "description": "占道经营",
        "media": [],
        "channel": "hotline",
        "reporter_id": "0193a1b2-0000-7000-8000-000000000001",
        "occurred_at": "2026-11-20T08:30:00Z"
    })
}

/// A valid submission with one field replaced by arbitrary JSON.
fn mutated() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec![
            "submission_id",
            "kind",
            "category",
            "location",
            "description",
            "media",
            "channel",
            "reporter_id",
            "occurred_at",
            "contact",
            "extra",
        ]),
        arbitrary_json(),
        "[a-zA-Z0-9_-]{8,20}",
    )
        .prop_map(|(field, value, id)| {
            let mut body = valid(&id);
            body[field] = value;
            body
        })
}

fn run(core: &mut Core, policy: &Policy, bytes: &[u8]) {
    let receipt = match decode_submission(
        bytes,
        Some("fallback-id-1"),
        &Limits::default(),
        &policy.taxonomy,
    ) {
        Ok(submission) => {
            core.plan(
                submission,
                bytes,
                Timestamp(1_790_000_000_000),
                intake::Routing::AtFiling,
                &BoxLocator,
                policy,
            )
            .receipt
        }
        Err(refusal) => Receipt::Rejected {
            submission_id: refusal.submission_id,
            reason_code: refusal.reason_code,
            message: refusal.message,
        },
    };
    assert!(
        matches!(
            receipt,
            Receipt::Filed { .. } | Receipt::Merged { .. } | Receipt::Rejected { .. }
        ),
        "{receipt:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_end_in_a_receipt(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let policy = &*POLICY;
        let mut core = Core::new(CoreConfig::default());
        run(&mut core, policy, &bytes);
    }

    #[test]
    fn arbitrary_json_ends_in_a_receipt(value in arbitrary_json()) {
        let policy = &*POLICY;
        let mut core = Core::new(CoreConfig::default());
        run(&mut core, policy, value.to_string().as_bytes());
    }

    #[test]
    fn mutated_submissions_end_in_a_receipt(values in prop::collection::vec(mutated(), 1..8)) {
        let policy = &*POLICY;
        let mut core = Core::new(CoreConfig::default());
        for value in values {
            run(&mut core, policy, value.to_string().as_bytes());
        }
    }
}
