//! `wangge demo`, shortened (few reports, short settle), runs to the end: four services, the
//! seeded city, reports and consoles; exit 0 with every check passed and the outputs written.

use std::process::Command;

#[test]
fn a_short_demo_passes_its_checks_and_writes_its_outputs() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args([
            "demo",
            "--reports",
            "120",
            "--rate",
            "60",
            "--settle-seconds",
            "3",
        ])
        .arg("--out")
        .arg(out.path())
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_LOG__FILTER", "warn")
        .output()
        .expect("run wangge demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 5, "{checks:?}");
    assert!(
        checks.iter().all(|check| check["passed"] == true),
        "{checks:?}"
    );
    assert_eq!(report["grids"]["communities"], 24);
    assert!(report["grids"]["grids"].as_u64().unwrap() > 200);
    assert_eq!(report["residents"]["stored"], 120);
    assert!(report["incidents"]["total"].as_u64().unwrap() > 0);
    assert!(
        stdout.contains("== wangge demo report (seed 2026) =="),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(out.path().join("map.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("350402001001001"));
    let grids: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("grids.geojson")).unwrap()).unwrap();
    assert_eq!(
        grids["features"].as_array().unwrap().len() as u64,
        report["grids"]["grids"].as_u64().unwrap()
    );
    for service in ["registry", "intake", "dispatch", "projection"] {
        assert!(
            out.path()
                .join("logs")
                .join(format!("{service}.log"))
                .exists()
        );
    }
}
