//! The benchmarks run end to end on a small load and every report they send is filed: a
//! benchmark whose reports intake refuses measures refusing, not filing (the pipeline
//! benchmark once published reports of every channel on `intake.submit.app`, and intake began
//! refusing the mismatch). The figures themselves are checked by people, not here: timings on
//! a shared machine make poor assertions.

use std::process::Command;

/// The last line of a `--json` run, parsed.
fn run(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(args)
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_LOG__FILTER", "warn")
        .output()
        .expect("run wangge");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wangge {args:?}: {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|error| panic!("last line not JSON ({error}): {last}"))
}

/// `raw_publish_per_s` is the median of three positive `raw_publish_rounds_per_s`.
fn assert_raw_is_the_median_of_its_rounds(result: &serde_json::Value) {
    let mut rounds: Vec<f64> = result["raw_publish_rounds_per_s"]
        .as_array()
        .unwrap_or_else(|| panic!("raw_publish_rounds_per_s: {result}"))
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .filter(|rate| *rate > 0.0)
        .collect();
    assert_eq!(rounds.len(), 3, "{result}");
    rounds.sort_by(f64::total_cmp);
    assert_eq!(
        result["raw_publish_per_s"].as_f64(),
        Some(rounds[1]),
        "{result}"
    );
}

/// Each of `keys` is a number above zero in `result`.
fn assert_positive(result: &serde_json::Value, keys: &[&str]) {
    for key in keys {
        assert!(
            result[key].as_f64().is_some_and(|value| value > 0.0),
            "{key}: {result}"
        );
    }
}

#[test]
fn bench_pipeline_files_every_report_it_sends() {
    let result = run(&[
        "bench",
        "pipeline",
        "--json",
        "--reports",
        "400",
        "--latency-rate",
        "100",
        "--latency-seconds",
        "1",
    ]);
    assert_eq!(
        (
            &result["reports"],
            &result["incidents"],
            &result["latency_samples"]
        ),
        (&400.into(), &400.into(), &100.into()),
        "{result}"
    );
    assert_positive(
        &result,
        &[
            "incidents_per_s",
            "raw_publish_per_s",
            "ratio",
            "p50_ms",
            "p99_ms",
        ],
    );
    assert_raw_is_the_median_of_its_rounds(&result);
}

#[test]
fn bench_intake_files_every_submission_it_sends() {
    let result = run(&[
        "bench",
        "intake",
        "--json",
        "--submissions",
        "400",
        "--latency-samples",
        "50",
    ]);
    assert_eq!(
        (&result["submissions"], &result["latency_samples"]),
        (&400.into(), &50.into()),
        "{result}"
    );
    assert_positive(
        &result,
        &[
            "filed_per_s",
            "raw_publish_per_s",
            "ratio",
            "p50_ms",
            "p99_ms",
        ],
    );
    assert_raw_is_the_median_of_its_rounds(&result);
}
