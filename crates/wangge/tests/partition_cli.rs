//! `wangge partition` and `wangge import osm` end to end: the built binary on small bad GeoJSON
//! files (every bad item named with its id and reason, bad files rejected whole) and on the
//! real OpenStreetMap extract in tests/data/osm (quality targets asserted).

use std::path::PathBuf;
use std::process::Command;

use expect_test::{Expect, expect};

/// A scratch directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!(
            "wangge-partition-cli-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Scratch(path)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("utf-8 path").to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Output {
    success: bool,
    stderr: String,
}

fn wangge(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(args)
        .env("RUST_LOG", "off")
        .env_remove("WANGGE_CONFIG")
        .output()
        .expect("run wangge");
    Output {
        success: output.status.success(),
        stderr: String::from_utf8_lossy(&output.stderr)
            .lines()
            .filter(|line| line.starts_with("error:") || line.starts_with("rejected"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Runs `wangge partition` on `input` with `extra` arguments; snapshots the exit status, the
/// rejection and error lines, and whether the grids file was written.
fn check(name: &str, input: &str, extra: &[&str], expect: Expect) {
    let scratch = Scratch::new(name);
    let input_path = scratch.file("input.geojson");
    std::fs::write(&input_path, input).expect("write input");
    let out = scratch.file("grids.geojson");
    let mut args = vec!["partition", "--input", &input_path, "--out", &out];
    args.extend_from_slice(extra);
    let output = wangge(&args);
    let grids = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v["features"].as_array().map(Vec::len));
    let stderr = output.stderr.replace(&input_path, "INPUT");
    expect.assert_eq(&format!(
        "success: {} grids written: {grids:?}\n{stderr}\n",
        output.success
    ));
}

const COMMUNITY: &str = r#"{"type":"Feature","properties":{"kind":"community","id":"c1","code":"431302001001"},"geometry":{"type":"Polygon","coordinates":[[[112.0,27.7],[112.01,27.7],[112.01,27.71],[112.0,27.71],[112.0,27.7]]]}}"#;

fn building(id: &str, households: &str, lon: f64, lat: f64) -> String {
    format!(
        r#"{{"type":"Feature","properties":{{"kind":"building","id":"{id}","households":{households}}},"geometry":{{"type":"Point","coordinates":[{lon},{lat}]}}}}"#
    )
}

fn collection(features: &[String]) -> String {
    format!(
        r#"{{"type":"FeatureCollection","features":[{}]}}"#,
        features.join(",")
    )
}

#[test]
fn empty_file_is_rejected_whole() {
    check(
        "empty",
        "  \n",
        &[],
        expect![[r#"
            success: false grids written: None
            error: INPUT: empty file: expected a GeoJSON FeatureCollection
        "#]],
    );
}

#[test]
fn non_geojson_file_is_rejected_whole() {
    check(
        "not-json",
        "id,households\nb1,20\n",
        &[],
        expect![[r#"
            success: false grids written: None
            error: INPUT: not GeoJSON (invalid JSON: expected value at line 1 column 1)
        "#]],
    );
    check(
        "not-collection",
        r#"{"type":"Point","coordinates":[1,2]}"#,
        &[],
        expect![[r#"
            success: false grids written: None
            error: INPUT: not a GeoJSON FeatureCollection (no "type": "FeatureCollection")
        "#]],
    );
}

#[test]
fn nan_is_not_json() {
    check(
        "nan",
        &collection(&[
            COMMUNITY.to_string(),
            building("b1", "10", f64::NAN, 27.705),
        ]),
        &[],
        expect![[r#"
            success: false grids written: None
            error: INPUT: not GeoJSON (invalid JSON: expected value at line 1 column 362)
        "#]],
    );
}

fn bad_items() -> String {
    collection(&[
        COMMUNITY.to_string(),
        // Self-intersecting (bow-tie) community.
        r#"{"type":"Feature","properties":{"kind":"community","id":"bowtie"},"geometry":{"type":"Polygon","coordinates":[[[113.0,27.0],[113.01,27.01],[113.01,27.0],[113.0,27.01],[113.0,27.0]]]}}"#.to_string(),
        // Bad code.
        r#"{"type":"Feature","properties":{"kind":"community","id":"c2","code":"4313"},"geometry":{"type":"Polygon","coordinates":[[[114.0,27.0],[114.01,27.0],[114.01,27.01],[114.0,27.0]]]}}"#.to_string(),
        building("good1", "120", 112.002, 27.702),
        building("good2", "90", 112.008, 27.708),
        building("good1", "10", 112.003, 27.703),
        building("neg", "-3", 112.004, 27.704),
        building("absurd", "1000000", 112.005, 27.705),
        building("frac", "2.5", 112.005, 27.705),
        building("far", "10", 120.0, 30.0),
        building("range", "10", 200.0, 27.7),
        r#"{"type":"Feature","properties":{"kind":"building","households":5},"geometry":{"type":"Point","coordinates":[112.001,27.701]}}"#.to_string(),
        r#"{"type":"Feature","properties":{"kind":"road","id":"r1"},"geometry":null}"#.to_string(),
        r#"{"type":"Feature","properties":{"kind":"building","id":"units","households":50,"units":[{"id":"1","households":20},{"id":"2","households":20}]},"geometry":{"type":"Point","coordinates":[112.006,27.706]}}"#.to_string(),
    ])
}

#[test]
fn bad_items_are_named_and_good_ones_partitioned() {
    check(
        "bad-items",
        &bad_items(),
        &[],
        expect![[r#"
            success: true grids written: Some(1)
            rejected community bowtie: invalid geometry: polygon at index 0 is invalid: exterior ring has a self-intersection
            rejected community c2: code "4313" is not 12 digits (district 6 + street 3 + community 3)
            rejected building good1: duplicate building id
            rejected building neg: households -3 is negative
            rejected building absurd: households 1000000 is absurd (more than 5000)
            rejected building frac: households 2.5 is not a non-negative integer
            rejected building range: coordinate (200, 27.7) is out of range (lon -180..180, lat -90..90)
            rejected building #11: missing or bad "id" (a non-empty string of at most 128 bytes)
            rejected feature r1: properties.kind is "road", expected "community" or "building"
            rejected building units: households 50 differ from the sum of its units 40
            rejected building far: outside every community
        "#]],
    );
}

#[test]
fn strict_rejects_the_whole_batch() {
    check(
        "strict",
        &bad_items(),
        &["--strict"],
        expect![[r#"
            success: false grids written: None
            rejected community bowtie: invalid geometry: polygon at index 0 is invalid: exterior ring has a self-intersection
            rejected community c2: code "4313" is not 12 digits (district 6 + street 3 + community 3)
            rejected building good1: duplicate building id
            rejected building neg: households -3 is negative
            rejected building absurd: households 1000000 is absurd (more than 5000)
            rejected building frac: households 2.5 is not a non-negative integer
            rejected building range: coordinate (200, 27.7) is out of range (lon -180..180, lat -90..90)
            rejected building #11: missing or bad "id" (a non-empty string of at most 128 bytes)
            rejected feature r1: properties.kind is "road", expected "community" or "building"
            rejected building units: households 50 differ from the sum of its units 40
            rejected building far: outside every community
            error: 11 bad feature(s) in INPUT and --strict is set: nothing written
        "#]],
    );
}

/// The real extract: import it, partition it, and hold the issue's quality targets.
#[test]
fn osm_extract_meets_the_quality_targets() {
    let scratch = Scratch::new("osm");
    let pbf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/osm/pyrosm-test.osm.pbf"
    );
    let geojson = scratch.file("city.geojson");
    let imported = wangge(&["import", "osm", pbf, "--out", &geojson]);
    assert!(imported.success, "{}", imported.stderr);
    let report_path = scratch.file("report.json");
    let out = scratch.file("grids.geojson");
    let svg = scratch.file("map.svg");
    let run = wangge(&[
        "partition",
        "--input",
        &geojson,
        "--out",
        &out,
        "--svg",
        &svg,
        "--report",
        &report_path,
    ]);
    assert!(run.success, "{}", run.stderr);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).expect("report"))
            .expect("report is JSON");
    let total = &report["total"];
    let figure = |name: &str| total[name].as_f64().unwrap_or(f64::NAN);
    let verdict = format!(
        "buildings {} grids {} in_range_share {:.3} disconnected {} pp_median {:.3} (>= 0.45: {}) pp_p10 {:.3} (>= 0.30: {}) rejected {}\n",
        total["buildings"],
        total["grids"],
        figure("in_range_share"),
        total["disconnected"],
        figure("pp_median"),
        figure("pp_median") >= 0.45,
        figure("pp_p10"),
        figure("pp_p10") >= 0.30,
        report["rejected"].as_array().map_or(0, Vec::len),
    );
    expect![[r#"
        buildings 2171 grids 24 in_range_share 1.000 disconnected 0 pp_median 0.520 (>= 0.45: true) pp_p10 0.339 (>= 0.30: true) rejected 0
    "#]].assert_eq(&verdict);
    let svg_text = std::fs::read_to_string(&svg).expect("svg");
    assert!(svg_text.starts_with("<svg") && svg_text.contains("<circle"));
    // Derived from OpenStreetMap data: every output carries the input's ODbL notice.
    let grids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("grids")).expect("JSON");
    for (what, attribution) in [
        ("grids", grids["attribution"].as_str()),
        ("report", report["attribution"].as_str()),
    ] {
        assert!(
            attribution.is_some_and(|a| a.contains("OpenStreetMap contributors, ODbL")),
            "{what}: {attribution:?}"
        );
    }
    assert!(svg_text.contains("© OpenStreetMap contributors, ODbL"));
}

/// Communities without a code are numbered in input order without wrapping; a code used
/// twice refuses the later community instead of giving two communities' grids one code.
#[test]
fn community_codes_are_never_shared() {
    let square = |id: &str, code: Option<&str>, lon: f64| {
        let code = code.map_or(String::new(), |code| format!(r#","code":"{code}""#));
        format!(
            r#"{{"type":"Feature","properties":{{"kind":"community","id":"{id}"{code}}},"geometry":{{"type":"Polygon","coordinates":[[[{lon},27.0],[{lon1},27.0],[{lon1},27.01],[{lon},27.01],[{lon},27.0]]]}}}}"#,
            lon1 = lon + 0.01
        )
    };
    let scratch = Scratch::new("codes");
    let input = scratch.file("input.geojson");
    std::fs::write(
        &input,
        collection(&[
            square("a", Some("431302001001"), 113.0),
            square("b", Some("431302001001"), 113.1),
            square("c", None, 113.2),
            square("d", None, 113.3),
            building("in-a", "100", 113.005, 27.005),
            building("in-c", "100", 113.205, 27.005),
            building("in-d", "100", 113.305, 27.005),
        ]),
    )
    .expect("write input");
    let out = scratch.file("grids.geojson");
    let run = wangge(&["partition", "--input", &input, "--out", &out]);
    assert!(run.success, "{}", run.stderr);
    let grids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("grids")).expect("JSON");
    let codes: Vec<String> = grids["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                f["properties"]["community"], f["properties"]["grid_code"]
            )
        })
        .collect();
    expect![[r#"
        rejected community b: community code 431302001001 is used by another community
        "a" "431302001001001"
        "c" "000000000001001"
        "d" "000000000002001"
    "#]]
    .assert_eq(&format!("{}\n{}\n", run.stderr, codes.join("\n")));
}

/// A file that is not .osm.pbf (here GeoJSON) is named as such, not as a corrupt block.
#[test]
fn import_osm_names_a_file_that_is_not_pbf() {
    let scratch = Scratch::new("not-pbf");
    let input = scratch.file("city.geojson");
    std::fs::write(&input, r#"{"type":"FeatureCollection","features":[]}"#).expect("write");
    let out = scratch.file("out.geojson");
    let run = wangge(&["import", "osm", &input, "--out", &out]);
    assert!(!run.success);
    assert!(
        run.stderr.contains("is not an OpenStreetMap .osm.pbf file"),
        "{}",
        run.stderr
    );
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
}
