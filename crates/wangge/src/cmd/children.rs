//! Services as child processes of this binary, for the demo and the pipeline benchmark:
//! the same `wangge serve <service>` a city runs, stopped (SIGTERM, then SIGKILL) on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Longest wait for a service to exit after SIGTERM before it is killed.
const SERVICE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a service to answer its first request.
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request each service answers once it has started (any answer will do): service, subject,
/// body.
pub const READINESS_PROBES: [(&str, &str, &str); 4] = [
    (
        "registry",
        "grids.query.community",
        r#"{"community_id":"probe"}"#,
    ),
    (
        "intake",
        "intake.query.receipt",
        r#"{"submission_id":"probe-0000"}"#,
    ),
    ("dispatch", "dispatch.cmd.city.verify", "{}"),
    ("projection", "projection.query.totals", "{}"),
];

/// The services, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug, Default)]
pub struct Services {
    children: Vec<(String, Child)>,
    /// Settings every child gets as `WANGGE_*` variables (see [`Services::share_policy`]).
    shared: Vec<(String, String)>,
}

impl Services {
    /// Children started after this run on the city and policy files of `settings` (this
    /// process's effective ones, from its file or environment), so that a demo's residents
    /// and consoles, planned from this process's policy, meet services deciding on the same.
    pub fn share_policy(&mut self, settings: &crate::config::Settings) {
        self.shared
            .push(("WANGGE_CITY".to_owned(), settings.city.clone()));
        for (key, file) in [
            (
                "WANGGE_POLICY__CATEGORIES_FILE",
                &settings.policy.categories_file,
            ),
            ("WANGGE_POLICY__ROUTING_FILE", &settings.policy.routing_file),
            (
                "WANGGE_POLICY__CALENDAR_FILE",
                &settings.policy.calendar_file,
            ),
        ] {
            if let Some(file) = file {
                self.shared
                    .push((key.to_owned(), file.display().to_string()));
            }
        }
    }

    /// Starts `wangge <args>` against `url`; its output goes to `<logs>/<name>.log`, or only
    /// its warnings to this process's stderr when `logs` is `None`.
    pub fn spawn(
        &mut self,
        name: &str,
        args: &[String],
        url: &str,
        logs: Option<&Path>,
    ) -> anyhow::Result<()> {
        let mut command = Command::new(std::env::current_exe().context("find the wangge binary")?);
        // The children run on the private server with the defaults, whatever this process was
        // given for a deployment (a metrics port, replicas, credentials, a config file):
        // every `WANGGE_*` setting is left out, except the log filter (below) and the
        // process's runtime tuning (`WANGGE_RUNTIME__*`, which benchmarks compare).
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|key| {
                key.starts_with("WANGGE_")
                    && key != "WANGGE_LOG__FILTER"
                    && !key.starts_with("WANGGE_RUNTIME__")
            }) {
                command.env_remove(key);
            }
        }
        command
            .args(args)
            .envs(self.shared.iter().map(|(key, value)| (key, value)))
            .env("WANGGE_NATS__URL", url)
            .stdin(Stdio::null());
        match logs {
            Some(logs) => {
                let log_path = logs.join(format!("{name}.log"));
                let log = std::fs::File::create(&log_path)
                    .with_context(|| format!("create {}", log_path.display()))?;
                command
                    .env("WANGGE_LOG__FORMAT", "json")
                    .stdout(log.try_clone().context("log file")?)
                    .stderr(log);
            }
            None => {
                // A `WANGGE_LOG__FILTER` given to this process reaches its services too (for
                // example `warn,intake::batch=debug` for intake's batch sizes and timings).
                let filter = std::env::var("WANGGE_LOG__FILTER")
                    .unwrap_or_else(|_| "warn,async_nats=error".to_owned());
                command
                    .env("WANGGE_LOG__FILTER", filter)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
            }
        }
        let child = command.spawn().with_context(|| format!("start {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Waits until every started service of [`READINESS_PROBES`] answers;
    /// `on_ready(service, subject)` after each. Fails when a service exits or does not answer within a minute.
    pub async fn wait_ready(
        &mut self,
        client: &async_nats::Client,
        mut on_ready: impl FnMut(&str, &str),
    ) -> anyhow::Result<()> {
        for (name, subject, body) in READINESS_PROBES {
            if !self.children.iter().any(|(started, _)| started == name) {
                continue;
            }
            let deadline = Instant::now() + SERVICE_READY_TIMEOUT;
            loop {
                self.check_alive()?;
                let request = client.request(subject.to_owned(), body.to_owned().into());
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), request).await {
                    on_ready(name, subject);
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{name} did not answer on {subject} within {SERVICE_READY_TIMEOUT:?}; see its log"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().context("poll a service")? {
                anyhow::bail!("service {name} exited early ({status}); see its log");
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        for (name, child) in &mut self.children {
            // Only a child not yet reaped: the id of one reaped (by `check_alive`) may belong
            // to another process by now.
            if let Ok(None) = child.try_wait()
                && let Some(pid) = i32::try_from(child.id())
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                && let Err(error) =
                    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            {
                tracing::warn!(service = %name, %error, "send SIGTERM");
            }
        }
        let deadline = Instant::now() + SERVICE_STOP_TIMEOUT;
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        tracing::warn!(service = %name, "did not stop in time; killed");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `work` until it ends or SIGINT/SIGTERM arrives; on a signal, `work` is dropped and
/// an error returned, so that the caller goes on to stop its services and its private
/// nats-server (whose store directory is removed) instead of leaving them behind.
pub async fn until_signalled<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        outcome = work => outcome,
        signal = super::serve::termination() => {
            let signal = signal?;
            anyhow::bail!("stopped by {signal}; stopping the services")
        }
    }
}
