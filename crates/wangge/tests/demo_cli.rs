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
    assert_eq!(checks.len(), 7, "{checks:?}");
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

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its closing paren.
        let after_comm = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let parent = after_comm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok());
        if parent == Some(pid) {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            children.push((child, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    children
}

/// SIGTERM to the demo alone (a CI timeout, `kill <pid>`) stops its services and its private
/// nats-server before it exits, with an exit status that says it did not finish.
#[test]
fn a_signalled_demo_stops_its_services_and_server() {
    use std::io::BufRead as _;
    let out = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(["demo", "--reports", "120", "--rate", "60"])
        .arg("--out")
        .arg(out.path())
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_LOG__FILTER", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wangge demo");
    let mut lines = std::io::BufReader::new(demo.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("demo ended early: {seen:#?}"))
            .unwrap();
        let ready = line.contains("projection is answering");
        seen.push(line);
        if ready {
            break;
        }
    }
    let children = children_of(demo.id());
    assert!(
        children
            .iter()
            .filter(|(_, cmd)| cmd.contains(" serve "))
            .count()
            == 4
            && children.iter().any(|(_, cmd)| cmd.contains("nats-server")),
        "{children:#?}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = demo.wait().unwrap();
    let left: Vec<_> = children
        .iter()
        .filter(|(pid, _)| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    for (pid, _) in &left {
        // Never leave them running, even when the test fails.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(left.is_empty(), "left running: {left:#?}");
    assert!(!exit.success(), "a stopped demo must not exit 0");
    assert!(
        rest.iter().any(|line| line.contains("stopped by SIGTERM")),
        "{rest:#?}"
    );
}
