//! Golden bytes of every stored event version. The files under `tests/golden/` were written
//! once (`WANGGE_WRITE_GOLDEN=1 cargo test -p registry --test golden` writes only missing
//! files) and are never rewritten: they must decode to today's events forever.

use std::path::PathBuf;

use eventstore::EventCodec as _;
use expect_test::{Expect, expect};
use geo::{LineString, MultiPolygon, Point, Polygon};
use partition::Flag;
use registry::RegistryCodec;
use registry::domain::{
    Building, CommunityProfile, DrawMode, Event, GridRecord, GridWorker, ItemRejection,
};

fn square(x: f64, y: f64, side: f64) -> Polygon<f64> {
    Polygon::new(
        LineString::from(vec![
            (x, y),
            (x + side, y),
            (x + side, y + side),
            (x, y + side),
            (x, y),
        ]),
        vec![],
    )
}

fn profile() -> CommunityProfile {
    CommunityProfile {
        code: "350402001001".to_owned(),
        name: "列东社区".to_owned(),
        street: "列东街道".to_owned(),
        district: "三元区".to_owned(),
        boundary: MultiPolygon::new(vec![square(117.63, 26.26, 0.004)]),
    }
}

fn samples() -> Vec<(&'static str, Event)> {
    vec![
        (
            "community_registered.v1",
            Event::CommunityRegistered {
                profile: profile(),
                registered_at_ms: 1_767_225_600_000,
            },
        ),
        (
            "community_updated.v1",
            Event::CommunityUpdated { profile: profile() },
        ),
        (
            "buildings_imported.v1",
            Event::BuildingsImported {
                buildings: vec![Building {
                    id: "b1".to_owned(),
                    position: Point::new(117.631, 26.261),
                    households: 60,
                    population: Some(180),
                }],
                rejected: vec![ItemRejection {
                    building_id: "far".to_owned(),
                    reason_code: "outside_boundary".to_owned(),
                    message: "outside".to_owned(),
                }],
            },
        ),
        (
            "grids_drawn.v1",
            Event::GridsDrawn {
                mode: DrawMode::Repair,
                drawn: vec![GridRecord {
                    grid_code: "350402001001001".to_owned(),
                    households: 270,
                    population: 810,
                    members: vec!["b1".to_owned(), "b2".to_owned()],
                    flags: vec![Flag::OutOfRange, Flag::Disconnected],
                    polygon: square(117.63, 26.26, 0.002),
                    detached: vec![square(117.633, 26.263, 0.0005)],
                }],
                retired: vec!["350402001001004".to_owned()],
                unchanged: 2,
            },
        ),
        (
            "grid_worker_assigned.v1",
            Event::GridWorkerAssigned {
                grid_code: "350402001001001".to_owned(),
                worker: GridWorker {
                    worker_id: "w-001".to_owned(),
                    name: "王芳".to_owned(),
                },
                assigned_at_ms: 1_767_225_600_001,
            },
        ),
    ]
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.bin"))
}

fn check(name: &str, event: &Event, expect: Expect) {
    let codec = RegistryCodec;
    let encoded = codec.encode(event).expect("encode");
    let path = golden_path(name);
    if std::env::var_os("WANGGE_WRITE_GOLDEN").is_some() && !path.exists() {
        std::fs::write(&path, &encoded.payload).expect("write golden file");
    }
    let stored = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error} (write it once with WANGGE_WRITE_GOLDEN=1)",
            path.display()
        )
    });
    let decoded = codec
        .decode(&encoded.event_type, encoded.schema_version, &stored)
        .expect("golden bytes decode");
    assert_eq!(
        &decoded, event,
        "{name}: golden bytes decode to another event"
    );
    assert_eq!(
        encoded.payload, stored,
        "{name}: today's encoder writes other bytes than the frozen v1"
    );
    expect.assert_eq(&format!(
        "{} v{} {} bytes",
        encoded.event_type,
        encoded.schema_version,
        stored.len()
    ));
}

#[test]
fn golden_bytes_decode_forever() {
    let expectations = [
        expect!["community_registered v1 138 bytes"],
        expect!["community_updated v1 132 bytes"],
        expect!["buildings_imported v1 54 bytes"],
        expect!["grids_drawn v1 215 bytes"],
        expect!["grid_worker_assigned v1 35 bytes"],
    ];
    for ((name, event), expect) in samples().iter().zip(expectations) {
        check(name, event, expect);
    }
}

#[test]
fn unknown_versions_are_refused() {
    let error = RegistryCodec
        .decode("grids_drawn", 2, &[])
        .expect_err("v2 does not exist");
    expect!["unknown event type grids_drawn v2"].assert_eq(&error.to_string());
}
