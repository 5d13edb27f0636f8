//! Structured logs: `pretty` for a terminal, `json` (one object per line) for collectors.
//! `RUST_LOG` overrides the configured filter.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Installs the subscriber. A filter that does not parse (from settings or `RUST_LOG`) is an
/// error, not a silent fallback: an operator who asked for `debug` must not get `info`.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let (filter, from) = effective_filter(filter);
    let filter = EnvFilter::try_new(&filter).map_err(|error| match from {
        "RUST_LOG" => anyhow::anyhow!("RUST_LOG={filter:?} is not a log filter: {error}"),
        _ => anyhow::anyhow!("log.filter {filter:?} is not a log filter: {error}"),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => {
            // Colour only for a person at a terminal (and never with NO_COLOR set).
            let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none();
            builder.compact().with_ansi(colour).init();
        }
        // The event's fields top-level, its context once: every enclosing span, outermost
        // first (`serve` with the instance, then e.g. the incident's).
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

/// The line a failed run writes when the log filter would drop its error: the fields the JSON
/// subscriber writes for `tracing::error!(error, "wangge failed")`.
pub fn fatal_json_line(message: &str) -> String {
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    serde_json::json!({
        "timestamp": timestamp,
        "level": "ERROR",
        "message": "wangge failed",
        "error": message,
        "target": "wangge",
    })
    .to_string()
}

/// The log filter that applies, and where it comes from: `RUST_LOG` when set (and not
/// blank), else the settings' `log.filter`.
pub fn effective_filter(configured: &str) -> (String, &'static str) {
    match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.trim().is_empty() => (from_env, "RUST_LOG"),
        _ => (configured.to_owned(), "log.filter"),
    }
}

/// An error and its causes on one line, each cause once: libraries often repeat their
/// source in their own message, which `{:#}` would print again.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        match parts.last_mut() {
            Some(last) if last.contains(&text) => {}
            Some(last) if text.starts_with(last.as_str()) => *last = text,
            _ => parts.push(text),
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn a_cause_repeated_in_its_parent_is_shown_once() {
        /// Like async-nats's connect error: its message repeats its source.
        #[derive(Debug)]
        struct Io(std::io::Error);
        impl std::fmt::Display for Io {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "IO error: {}", self.0)
            }
        }
        impl std::error::Error for Io {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let error = anyhow::Error::new(Io(io)).context("connect to NATS at nats://127.0.0.1:1");
        assert_eq!(
            error_chain(&error),
            "connect to NATS at nats://127.0.0.1:1: IO error: Connection refused"
        );
        let error = anyhow::anyhow!("create or update stream GRIDS: jetstream error")
            .context("create or update stream GRIDS");
        assert_eq!(
            error_chain(&error),
            "create or update stream GRIDS: jetstream error"
        );
        let error = anyhow::anyhow!("disk full").context("append to incidents.ev.x");
        assert_eq!(error_chain(&error), "append to incidents.ev.x: disk full");
    }
}
