//! `wangge config` as an operator meets it: what the environment may hold, and the messages
//! for what it must not.

use std::process::Command;

use expect_test::{Expect, expect};

/// Runs `wangge config` with `env` (and `args` before the subcommand); returns the exit code
/// and stderr, or "ok" when it succeeded.
fn check(args: &[&str], env: &[(&str, &str)], expect: Expect) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wangge"));
    for (key, _) in std::env::vars() {
        if key.starts_with("WANGGE_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    let output = command
        .args(args)
        .arg("config")
        .envs(env.iter().copied())
        .output()
        .expect("run wangge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes in a pipe: {stderr:?}"
    );
    let shown = if output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let log = stdout
            .lines()
            .skip_while(|line| *line != "[log]")
            .take(3)
            .collect::<Vec<_>>()
            .join("\n");
        format!("ok\n{log}")
    } else {
        format!("exit {:?}\n{}", output.status.code(), stderr.trim_end())
    };
    expect.assert_eq(&shown);
}

#[test]
fn deployment_variables_are_not_settings() {
    check(
        &[],
        &[
            ("WANGGE_NATS_PASS_ADMIN", "secret"),
            ("WANGGE_NATS_SERVER_NAME", "nats-1"),
        ],
        expect![[r#"
            ok
            [log]
            format = "pretty"
            filter = "info,async_nats=warn""#]],
    );
}

#[test]
fn the_log_filter_shown_is_the_one_used() {
    check(
        &[],
        &[("RUST_LOG", "debug")],
        expect![[r#"
            ok
            [log]
            format = "pretty"
            filter = "debug""#]],
    );
}

#[test]
fn the_log_format_shown_is_the_one_used() {
    check(
        &["--log-format", "json"],
        &[],
        expect![[r#"
            ok
            [log]
            format = "json"
            filter = "info,async_nats=warn""#]],
    );
}

#[test]
fn mistakes_are_named_where_they_were_made() {
    check(
        &[],
        &[("WANGGE_NATS__URLL", "nats://x")],
        expect![[r#"
            exit Some(2)
            error: read configuration from WANGGE_* variables: unknown setting "nats.urll" (from environment variable WANGGE_NATS__URLL); the keys of [nats] are: url, credentials, client_name, user, password, inbox_prefix, tls_ca_file, tls_cert_file, tls_key_file"#]],
    );
    check(
        &[],
        &[("WANGGE_OBSERVE__MICRO_SERVICE", "false")],
        expect![[r#"
            exit Some(2)
            error: invalid settings (from WANGGE_* variables): observe.micro_service = false is not supported: every service's request subjects are NATS micro-service endpoints, which answer $SRV.PING/INFO/STATS as well"#]],
    );
    check(
        &[],
        &[("WANGGE_CITY", "paris")],
        expect![[r#"
            exit Some(2)
            error: invalid settings (from WANGGE_* variables): city "paris" has no built-in policy and standards; the cities are sanming, yixing, wuhan, hangzhou, loudi"#]],
    );
    check(
        &[],
        &[("WANGGE_LOG__FILTER", "info,,=[")],
        expect![[r#"
            exit Some(2)
            error: log.filter "info,,=[" is not a log filter: invalid filter directive"#]],
    );
    check(
        &[],
        &[("RUST_LOG", "info,,=[")],
        expect![[r#"
            exit Some(2)
            error: RUST_LOG="info,,=[" is not a log filter: invalid filter directive"#]],
    );
    check(
        &[],
        &[("WANGGE_CONFIG", "")],
        expect![[r#"
            exit Some(2)
            error: WANGGE_CONFIG is set but empty: unset it, or set it to the path of a TOML configuration file"#]],
    );
    check(
        &[],
        &[("WANGGE_LOG_FORMAT", "")],
        expect![[r#"
            exit Some(2)
            error: WANGGE_LOG_FORMAT is set but empty: unset it, or set it to `pretty` or `json`"#]],
    );
    // Refused beside its flag too (clap reads both), and still named.
    check(
        &["--config", "/"],
        &[("WANGGE_CONFIG", "")],
        expect![[r#"
            exit Some(2)
            error: WANGGE_CONFIG is set but empty: unset it, or set it to the path of a TOML configuration file"#]],
    );
    check(
        &["--config", "/"],
        &[],
        expect![[r#"
            exit Some(2)
            error: config file / is not a file"#]],
    );
}

/// In JSON log mode, a failed run says why on stderr whatever the log filter: a filter that
/// leaves this crate's errors off (`RUST_LOG=intake=debug`) used to leave nothing at all.
#[test]
fn a_failure_is_logged_whatever_the_filter() {
    for filter in ["intake=debug", "off", "info"] {
        let output = Command::new(env!("CARGO_BIN_EXE_wangge"))
            .args(["audit", "verify"])
            .env_remove("WANGGE_CONFIG")
            .env("WANGGE_LOG__FORMAT", "json")
            .env("RUST_LOG", filter)
            .env("WANGGE_NATS__URL", "nats://127.0.0.1:1")
            .output()
            .expect("run wangge");
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|line| line.contains("wangge failed"))
            .unwrap_or_else(|| panic!("{filter}: {stderr:?}"));
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(value["level"], "ERROR", "{line}");
        assert!(
            value["error"]
                .as_str()
                .is_some_and(|error| error.contains("connect to NATS")),
            "{line}"
        );
    }
}
