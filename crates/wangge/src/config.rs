//! Settings: built-in defaults, then the TOML file, then `WANGGE_*` environment variables.
//!
//! Nested keys use a double underscore in the environment: `[nats] url` is
//! `WANGGE_NATS__URL`, `[store] replicas` is `WANGGE_STORE__REPLICAS`. Unknown keys in the
//! file are an error, so a typo does not silently fall back to a default.

use std::path::Path;

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::logging::LogFormat;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    pub store: StoreSettings,
    pub log: LogSettings,
    pub observe: ObserveSettings,
    /// Which city's data files (routing, calendar, standards) the services load.
    pub city: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Comma-separated server URLs.
    pub url: String,
    /// Optional credentials file (NATS decentralised auth).
    pub credentials: Option<std::path::PathBuf>,
    /// Name this client reports to the server (shows in `nats server report connections`).
    pub client_name: String,
    /// User and password (deploy/nats/accounts.conf: one user per role). Prefer the
    /// environment for the password: `WANGGE_NATS__PASSWORD`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Prefix of this client's reply inboxes. The deploy accounts let each user subscribe
    /// only to `_INBOX_<user>.>`, so no one reads another's replies: set `_INBOX_<user>`.
    pub inbox_prefix: String,
    /// CA certificate (PEM) to verify the servers with; setting it requires TLS.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients (mutual TLS).
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
}

/// Operational signals of a running service (`wangge serve ...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObserveSettings {
    /// Address of the HTTP endpoint with `/metrics` (Prometheus text) and `/healthz`;
    /// empty (the default, so several services on one host never clash): none. Set it per
    /// service, e.g. `WANGGE_OBSERVE__METRICS_ADDRESS=0.0.0.0:9464`. Port 0 picks a free
    /// port (logged at start). A port already taken stops the service at start.
    pub metrics_address: String,
    /// Register as a NATS micro service (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`).
    pub micro_service: bool,
    /// How often stream lag (stream end minus the service's reached sequence) is refreshed.
    pub lag_refresh_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// JetStream replicas for every stream: 1 (single node) or 3 (cluster).
    pub replicas: usize,
    /// Window in which JetStream drops a repeated `Nats-Msg-Id`, in seconds.
    pub duplicate_window_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,wangge=debug`.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            store: StoreSettings::default(),
            log: LogSettings::default(),
            observe: ObserveSettings::default(),
            city: "sanming".to_owned(),
        }
    }
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials: None,
            client_name: "wangge".to_owned(),
            user: None,
            password: None,
            inbox_prefix: "_INBOX".to_owned(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for ObserveSettings {
    fn default() -> Self {
        ObserveSettings {
            metrics_address: String::new(),
            micro_service: true,
            lag_refresh_seconds: 5,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            replicas: 1,
            duplicate_window_seconds: 120,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Pretty,
            filter: "info,async_nats=warn".to_owned(),
        }
    }
}

/// Flat variables that are not settings keys (they are read by clap or scripts).
const ENV_NOT_SETTINGS: [&str; 3] = ["config", "log_format", "nats_server"];

impl Settings {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = path {
            anyhow::ensure!(
                path.is_file(),
                "config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file_exact(path));
        }
        let settings: Settings = figment
            .merge(
                Env::prefixed("WANGGE_")
                    .ignore(&ENV_NOT_SETTINGS)
                    .split("__"),
            )
            .extract()
            .with_context(|| match path {
                Some(path) => format!(
                    "read configuration from {} and WANGGE_* variables",
                    path.display()
                ),
                None => "read configuration from WANGGE_* variables".to_owned(),
            })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.store.replicas == 1 || self.store.replicas == 3,
            "store.replicas must be 1 or 3, got {}",
            self.store.replicas
        );
        anyhow::ensure!(
            self.store.duplicate_window_seconds >= 1,
            "store.duplicate_window_seconds must be at least 1"
        );
        anyhow::ensure!(
            !self.nats.url.trim().is_empty(),
            "nats.url must not be empty"
        );
        anyhow::ensure!(
            self.nats.user.is_some() == self.nats.password.is_some(),
            "nats.user and nats.password go together"
        );
        anyhow::ensure!(
            self.nats.tls_cert_file.is_some() == self.nats.tls_key_file.is_some(),
            "nats.tls_cert_file and nats.tls_key_file go together"
        );
        anyhow::ensure!(
            !self.nats.inbox_prefix.is_empty()
                && !self
                    .nats
                    .inbox_prefix
                    .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace()),
            "nats.inbox_prefix must be one subject token, got {:?}",
            self.nats.inbox_prefix
        );
        anyhow::ensure!(
            self.observe.lag_refresh_seconds >= 1,
            "observe.lag_refresh_seconds must be at least 1"
        );
        Ok(())
    }
}

/// Prints the effective settings as TOML, with the NATS password redacted.
pub fn print(settings: &Settings) -> anyhow::Result<()> {
    let mut shown = settings.clone();
    if shown.nats.password.is_some() {
        shown.nats.password = Some("<redacted>".to_owned());
    }
    print!(
        "{}",
        toml::to_string_pretty(&shown).context("render settings as TOML")?
    );
    Ok(())
}
