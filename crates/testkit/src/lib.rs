//! Real nats-server processes for tests, benchmarks and the demo.
//!
//! wangge is only as good as its behaviour against the real bus, so nothing here mocks NATS:
//! every [`NatsServer`] is a `nats-server` child process with JetStream on file storage in its
//! own temporary directory, listening on free loopback ports. A [`NatsCluster`] is three of them
//! routed together, able to hold R3 streams.
//!
//! No server outlives its test. Each server runs under a tiny `sh` watchdog whose standard input
//! is a pipe held by this process: when the handle is dropped (also while a test panics) the
//! server is killed at once, and if the whole test process dies (a timeout, `kill -9`), the pipe
//! closes, the watchdog wakes up and kills the server. Fault injection works on the server
//! process itself: [`NatsServer::kill`] is `kill -9`, [`NatsServer::stop`] a graceful SIGTERM,
//! and [`NatsServer::restart`] brings it back on the same ports and the same store; a lagging
//! service is made by pausing its follower with the server's consumer pause API
//! ([`consumers::pause_follower`]).
#![forbid(unsafe_code)]

pub mod consumers;
pub mod schemas;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections and report JetStream healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll interval while waiting for a server to come up or go away.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// JetStream file store limit per test server.
const FILE_STORE_MAX_BYTES: u64 = 8 * 1024 * 1024 * 1024;
/// JetStream memory store limit per test server.
const MEMORY_STORE_MAX_BYTES: u64 = 512 * 1024 * 1024;

/// Waits for EOF on stdin, then kills the server. `$0` is the server binary.
const WATCHDOG_SCRIPT: &str = r#""$0" "$@" & server_pid=$!
echo "$server_pid"
cat >/dev/null
kill -9 "$server_pid" 2>/dev/null
wait "$server_pid" 2>/dev/null
exit 0"#;

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error(
        "no nats-server found: set WANGGE_NATS_SERVER, put nats-server >= 2.12 on PATH, \
         or run `scripts/nats-server.sh` (it installs the pinned 2.15.1 into tools/nats): {detail}"
    )]
    NoServerBinary { detail: String },
    #[error("{action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    #[error(
        "nats-server {name} did not become ready within {timeout:?}; last log lines:\n{log_tail}"
    )]
    NotReady {
        name: String,
        timeout: Duration,
        log_tail: String,
    },
}

fn io_error(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let action = action.into();
    move |source| TestkitError::Io { action, source }
}

/// Finds the nats-server binary: `$WANGGE_NATS_SERVER`, then the project's `tools/nats`, then
/// `nats-server` on PATH, and as a last resort installs the pinned one with
/// `scripts/nats-server.sh`.
pub fn nats_server_binary() -> Result<PathBuf, TestkitError> {
    if let Some(path) = std::env::var_os("WANGGE_NATS_SERVER") {
        let path = PathBuf::from(path);
        let refused = |why: String| TestkitError::NoServerBinary {
            detail: format!("WANGGE_NATS_SERVER={}: {why}", path.display()),
        };
        if !path.is_file() {
            return Err(refused("no such file".to_owned()));
        }
        let version = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|error| refused(format!("does not run: {error}")))?;
        let shown = String::from_utf8_lossy(&version.stdout);
        if !version.status.success() || !shown.starts_with("nats-server: v") {
            return Err(refused(format!(
                "`--version` did not answer like nats-server (got {:?})",
                shown.trim()
            )));
        }
        return Ok(path);
    }
    let root = workspace_root();
    let local = root.join("tools/nats/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let script = root.join("scripts/nats-server.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|error| TestkitError::NoServerBinary {
            detail: format!("run {}: {error}", script.display()),
        })?;
    if output.status.success() {
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        return Ok(PathBuf::from(path));
    }
    Err(TestkitError::NoServerBinary {
        detail: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// The workspace root, found from this crate's manifest directory at compile time.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// Reserves `count` distinct free loopback ports. The listeners are closed on return, so
/// another process could take a port in between; [`NatsServer::start`] retries on that.
fn free_ports(count: usize) -> Result<Vec<u16>, TestkitError> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(io_error("bind a free loopback port")))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|listener| {
            listener
                .local_addr()
                .map(|address| address.port())
                .map_err(io_error("read port"))
        })
        .collect()
}

/// Ports of one server.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    monitor: u16,
    cluster: Option<u16>,
}

/// What to add to a test server's generated config: a file to include (e.g.
/// `deploy/nats/accounts.conf`, the accounts and permissions of a deployment) and environment
/// variables for the server process (the passwords that file refers to as `$VARIABLE`).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Copied next to the generated config and included from it (nats-server resolves an
    /// include relative to the including file).
    pub include: Option<PathBuf>,
    /// Environment of the server process, on top of this process's.
    pub env: Vec<(String, String)>,
}

/// A server's message counters (`/varz`): what its clients sent it (`in`) and what it sent
/// them (`out`: deliveries, publish acks, replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageCounts {
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

impl MessageCounts {
    /// The counts from `earlier` to `self`.
    pub fn since(&self, earlier: &MessageCounts) -> MessageCounts {
        MessageCounts {
            in_msgs: self.in_msgs.saturating_sub(earlier.in_msgs),
            out_msgs: self.out_msgs.saturating_sub(earlier.out_msgs),
            in_bytes: self.in_bytes.saturating_sub(earlier.in_bytes),
            out_bytes: self.out_bytes.saturating_sub(earlier.out_bytes),
        }
    }
}

/// One nats-server process with JetStream on file storage.
#[derive(Debug)]
pub struct NatsServer {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    ports: Ports,
    config_path: PathBuf,
    store_dir: PathBuf,
    log_path: PathBuf,
    process: Option<Running>,
    // Owns the directories; removed on drop, after the process is gone.
    _home: Option<tempfile::TempDir>,
}

#[derive(Debug)]
struct Running {
    watchdog: Child,
    watchdog_stdin: Option<ChildStdin>,
    server_pid: u32,
}

impl NatsServer {
    /// Starts a single JetStream server on free loopback ports with a fresh store.
    pub fn start() -> Result<NatsServer, TestkitError> {
        NatsServer::start_with(&ServerOptions::default())
    }

    /// [`NatsServer::start`] with `options` (an included config file, environment).
    pub fn start_with(options: &ServerOptions) -> Result<NatsServer, TestkitError> {
        let binary = nats_server_binary()?;
        let home = tempfile::Builder::new()
            .prefix("wangge-nats-")
            .tempdir()
            .map_err(io_error("create temp dir"))?;
        // A port grabbed by someone else between reservation and bind makes start fail; retry.
        const START_ATTEMPTS_MAX: usize = 3;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS_MAX {
            let ports = free_ports(2)?;
            let ports = Ports {
                client: ports[0],
                monitor: ports[1],
                cluster: None,
            };
            let mut server =
                NatsServer::prepare(binary.clone(), home.path(), "n1", ports, &[], options)?;
            match server.spawn_and_wait() {
                Ok(()) => {
                    server._home = Some(home);
                    return Ok(server);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn prepare(
        binary: PathBuf,
        home: &Path,
        name: &str,
        ports: Ports,
        routes: &[u16],
        options: &ServerOptions,
    ) -> Result<NatsServer, TestkitError> {
        let node_dir = home.join(name);
        let store_dir = node_dir.join("jetstream");
        std::fs::create_dir_all(&store_dir)
            .map_err(io_error(format!("create {}", store_dir.display())))?;
        let config_path = node_dir.join("nats-server.conf");
        let log_path = node_dir.join("nats-server.log");
        let mut config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: {memory}\n  max_file_store: {file}\n}}\n",
            client = ports.client,
            monitor = ports.monitor,
            store = store_dir.display(),
            memory = MEMORY_STORE_MAX_BYTES,
            file = FILE_STORE_MAX_BYTES,
        );
        if let Some(cluster_port) = ports.cluster {
            let routes = routes
                .iter()
                .map(|port| format!("nats-route://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(", ");
            config.push_str(&format!(
                "cluster {{\n  name: wangge-test\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{routes}]\n}}\n"
            ));
        }
        if let Some(include) = &options.include {
            let file_name = include
                .file_name()
                .ok_or_else(|| TestkitError::Io {
                    action: format!("include {}", include.display()),
                    source: std::io::Error::other("not a file name"),
                })?
                .to_owned();
            std::fs::copy(include, node_dir.join(&file_name))
                .map_err(io_error(format!("copy {}", include.display())))?;
            config.push_str(&format!("include ./{}\n", file_name.to_string_lossy()));
        }
        std::fs::write(&config_path, config)
            .map_err(io_error(format!("write {}", config_path.display())))?;
        Ok(NatsServer {
            name: name.to_owned(),
            binary,
            env: options.env.clone(),
            ports,
            config_path,
            store_dir,
            log_path,
            process: None,
            _home: None,
        })
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        assert!(
            self.process.is_none(),
            "server {} is already running",
            self.name
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .arg("-l")
            .arg(&self.log_path)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_error(format!("spawn {}", self.binary.display())))?;
        let stdout = watchdog.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(io_error("read server pid from watchdog"))?;
        let server_pid = line
            .trim()
            .parse::<u32>()
            .map_err(|error| TestkitError::Io {
                action: format!("parse server pid {line:?}"),
                source: std::io::Error::other(error),
            })?;
        let watchdog_stdin = watchdog.stdin.take();
        self.process = Some(Running {
            watchdog,
            watchdog_stdin,
            server_pid,
        });
        Ok(())
    }

    fn spawn_and_wait(&mut self) -> Result<(), TestkitError> {
        self.spawn()?;
        let result = self.wait_ready(true);
        if result.is_err() {
            self.kill();
        }
        result
    }

    /// Waits until the client port accepts connections and, with `jetstream`, `/healthz`
    /// reports the server healthy.
    fn wait_ready(&self, jetstream: bool) -> Result<(), TestkitError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client: SocketAddr = ([127, 0, 0, 1], self.ports.client).into();
        while Instant::now() < deadline {
            let pid_alive = self
                .process
                .as_ref()
                .is_some_and(|running| process_alive(running.server_pid));
            if !pid_alive {
                break;
            }
            let port_open = TcpStream::connect_timeout(&client, POLL_INTERVAL).is_ok();
            if port_open && (!jetstream || self.healthz_ok()) {
                return Ok(());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Err(TestkitError::NotReady {
            name: self.name.clone(),
            timeout: READY_TIMEOUT,
            log_tail: self.log_tail(20),
        })
    }

    fn healthz_ok(&self) -> bool {
        http_get_status(self.ports.monitor, "/healthz") == Some(200)
    }

    /// True if this node leads the JetStream meta group and sees `peers` other nodes, each
    /// online and current (`/jsz`, `meta_cluster`).
    fn leads_meta_with_peers(&self, peers: usize) -> bool {
        let Some(body) = http_get_body(self.ports.monitor, "/jsz") else {
            return false;
        };
        let Ok(jsz) = serde_json::from_str::<serde_json::Value>(&body) else {
            return false;
        };
        let meta = &jsz["meta_cluster"];
        if meta["leader"].as_str() != Some(self.name.as_str()) {
            return false;
        }
        let replicas = meta["replicas"].as_array().map_or(&[][..], Vec::as_slice);
        replicas.len() == peers
            && replicas.iter().all(|replica| {
                replica["current"].as_bool() == Some(true)
                    && replica["offline"].as_bool() != Some(true)
            })
    }

    /// Messages and bytes this server has received from and sent to its clients since it
    /// started (`/varz`), or `None` if the monitoring endpoint did not answer.
    pub fn message_counts(&self) -> Option<MessageCounts> {
        let body = http_get_body(self.ports.monitor, "/varz")?;
        let varz = serde_json::from_str::<serde_json::Value>(&body).ok()?;
        Some(MessageCounts {
            in_msgs: varz["in_msgs"].as_u64()?,
            out_msgs: varz["out_msgs"].as_u64()?,
            in_bytes: varz["in_bytes"].as_u64()?,
            out_bytes: varz["out_bytes"].as_u64()?,
        })
    }

    /// `nats://127.0.0.1:<port>` of this server.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// The server's name (`server_name` in its config; cluster nodes are n1, n2, n3).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JetStream store directory, e.g. to corrupt or inspect files in a test.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Process id of the nats-server itself (not of its watchdog), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|running| running.server_pid)
    }

    pub fn is_running(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|running| process_alive(running.server_pid))
    }

    /// `kill -9`: the server gets no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(running) = self.process.take() {
            signal(running.server_pid, "KILL");
            wait_gone(running.server_pid, STOP_TIMEOUT);
            reap(running);
        }
    }

    /// Graceful stop (SIGTERM), falling back to `kill -9` after a timeout.
    pub fn stop(&mut self) {
        if let Some(running) = self.process.take() {
            signal(running.server_pid, "TERM");
            if !wait_gone(running.server_pid, STOP_TIMEOUT) {
                signal(running.server_pid, "KILL");
                wait_gone(running.server_pid, STOP_TIMEOUT);
            }
            reap(running);
        }
    }

    /// Starts the server again on the same ports with the same store (after `kill` or `stop`).
    /// Waits for the client port only: a cluster node's JetStream becomes healthy only once
    /// it has caught up with its peers, which [`NatsCluster::wait_healthy`] waits for.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        self.spawn()?;
        self.wait_ready(self.ports.cluster.is_none())
    }

    /// The last `lines` lines of the server's log file.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three routed JetStream servers (n1, n2, n3), able to hold R3 streams.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    _home: tempfile::TempDir,
}

/// Nodes in a test cluster.
pub const CLUSTER_SIZE: usize = 3;

impl NatsCluster {
    pub fn start() -> Result<NatsCluster, TestkitError> {
        NatsCluster::start_with(&ServerOptions::default())
    }

    /// [`NatsCluster::start`] with `options` applied to every node.
    pub fn start_with(options: &ServerOptions) -> Result<NatsCluster, TestkitError> {
        let binary = nats_server_binary()?;
        let home = tempfile::Builder::new()
            .prefix("wangge-cluster-")
            .tempdir()
            .map_err(io_error("create temp dir"))?;
        let ports = free_ports(CLUSTER_SIZE * 3)?;
        let node_ports: Vec<Ports> = (0..CLUSTER_SIZE)
            .map(|index| Ports {
                client: ports[index * 3],
                monitor: ports[index * 3 + 1],
                cluster: Some(ports[index * 3 + 2]),
            })
            .collect();
        let route_ports: Vec<u16> = node_ports
            .iter()
            .filter_map(|ports| ports.cluster)
            .collect();
        let mut nodes = Vec::with_capacity(CLUSTER_SIZE);
        for (index, ports) in node_ports.iter().enumerate() {
            let name = format!("n{}", index + 1);
            let mut node = NatsServer::prepare(
                binary.clone(),
                home.path(),
                &name,
                *ports,
                &route_ports,
                options,
            )?;
            node.spawn()?;
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes, _home: home };
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// Waits until every running node reports JetStream healthy (meta leader elected, caught up)
    /// and the meta leader sees every other running node online and current: before that, an
    /// R3 stream or bucket may be refused "no suitable peers for placement".
    pub fn wait_healthy(&self) -> Result<(), TestkitError> {
        let running: Vec<&NatsServer> = self
            .nodes
            .iter()
            .filter(|node| node.process.is_some())
            .collect();
        for node in &running {
            node.wait_ready(true)?;
        }
        let Some(first) = running.first() else {
            return Ok(());
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if running
                .iter()
                .any(|node| node.leads_meta_with_peers(running.len() - 1))
            {
                return Ok(());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Err(TestkitError::NotReady {
            name: format!(
                "meta group (no leader seeing every peer; log of {})",
                first.name
            ),
            timeout: READY_TIMEOUT,
            log_tail: first.log_tail(20),
        })
    }

    /// Comma-separated client URLs of all nodes, for `async_nats::connect`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    pub fn node_mut(&mut self, index: usize) -> &mut NatsServer {
        &mut self.nodes[index]
    }

    /// The index of the node with this `server_name` (as reported in stream cluster info).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }
}

/// The accounts and users of a deployment (`deploy/nats/accounts.conf`) for a test server, with
/// a fresh random password for each user (the file reads them from `$WANGGE_NATS_PASS_<USER>`).
#[derive(Debug, Clone)]
pub struct DeployAccounts {
    options: ServerOptions,
}

/// Environment variables the accounts file takes passwords from, by prefix.
const PASSWORD_ENV_PREFIX: &str = "WANGGE_NATS_PASS_";

impl DeployAccounts {
    /// Reads `deploy/nats/accounts.conf` of this workspace.
    pub fn load() -> Result<DeployAccounts, TestkitError> {
        DeployAccounts::from_file(&workspace_root().join("deploy/nats/accounts.conf"))
    }

    pub fn from_file(path: &Path) -> Result<DeployAccounts, TestkitError> {
        let text =
            std::fs::read_to_string(path).map_err(io_error(format!("read {}", path.display())))?;
        let mut names: Vec<String> = text
            .match_indices(&format!("${PASSWORD_ENV_PREFIX}"))
            .map(|(at, _)| {
                text[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .collect();
        names.sort();
        names.dedup();
        let mut env = Vec::with_capacity(names.len());
        for name in names {
            env.push((name, random_password()?));
        }
        Ok(DeployAccounts {
            options: ServerOptions {
                include: Some(path.to_path_buf()),
                env,
            },
        })
    }

    /// Options that start a server (or cluster) with these accounts.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// The password of `user` (e.g. `console-chengguan`), if the file names that user.
    pub fn password(&self, user: &str) -> Option<&str> {
        let variable = format!(
            "{PASSWORD_ENV_PREFIX}{}",
            user.to_ascii_uppercase().replace('-', "_")
        );
        self.options
            .env
            .iter()
            .find(|(name, _)| *name == variable)
            .map(|(_, password)| password.as_str())
    }
}

/// 128 random bits from the OS, hex.
fn random_password() -> Result<String, TestkitError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .map_err(io_error("read /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn process_alive(pid: u32) -> bool {
    // A killed server stays a zombie until its watchdog reaps it; count zombies as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    false
}

fn reap(mut running: Running) {
    drop(running.watchdog_stdin.take());
    let _ = running.watchdog.wait();
}

/// A minimal HTTP/1.0 GET on loopback returning the status code; enough for `/healthz`.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// The body of a small HTTP/1.0 GET on the monitoring port, if it answered 200.
fn http_get_body(port: u16, path: &str) -> Option<String> {
    http_get(port, path).and_then(|(status, body)| (status == 200).then_some(body))
}

/// Status and body of a small HTTP/1.0 GET on the monitoring port.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_server_starts_kills_restarts_and_cleans_up() {
        let mut server = NatsServer::start().expect("start nats-server");
        let pid = server.pid().expect("running");
        assert!(process_alive(pid));
        let store = server.store_dir().to_path_buf();
        assert!(store.is_dir());
        server.kill();
        assert!(!process_alive(pid));
        server.restart().expect("restart");
        let new_pid = server.pid().expect("running again");
        assert_ne!(pid, new_pid);
        drop(server);
        assert!(!process_alive(new_pid));
        assert!(!store.exists(), "store dir removed on drop");
    }

    #[test]
    fn message_counts_see_a_publish() {
        let server = NatsServer::start().expect("start nats-server");
        let before = server.message_counts().expect("varz answers");
        let address: SocketAddr = ([127, 0, 0, 1], server.ports.client).into();
        let mut client = TcpStream::connect(address).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // The core protocol by hand: one 5-byte message, then a ping to know it was read.
        write!(
            client,
            "CONNECT {{\"verbose\":false}}\r\nPUB counted.subject 5\r\nhello\r\nPING\r\n"
        )
        .expect("send");
        let mut seen = String::new();
        let mut buffer = [0u8; 4096];
        while !seen.contains("PONG") {
            let read = client.read(&mut buffer).expect("read");
            assert!(read > 0, "server closed the connection: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
        let counted = server
            .message_counts()
            .expect("varz answers")
            .since(&before);
        assert_eq!((counted.in_msgs, counted.in_bytes), (1, 5), "{counted:?}");
    }

    #[test]
    fn server_is_killed_when_its_handle_is_dropped_during_a_panic() {
        let pid_slot = std::sync::Arc::new(std::sync::Mutex::new(None));
        let slot = pid_slot.clone();
        let outcome = std::thread::spawn(move || {
            let server = NatsServer::start().expect("start nats-server");
            *slot.lock().expect("lock") = server.pid();
            panic!("test failure while the server runs");
        })
        .join();
        assert!(outcome.is_err());
        let pid = pid_slot.lock().expect("lock").expect("pid recorded");
        assert!(wait_gone(pid, STOP_TIMEOUT));
    }

    #[test]
    fn watchdog_kills_the_server_when_the_owner_vanishes() {
        let mut server = NatsServer::start().expect("start nats-server");
        let pid = server.pid().expect("running");
        // Simulate the owning process dying: its end of the pipe closes.
        let running = server.process.as_mut().expect("running");
        drop(running.watchdog_stdin.take());
        assert!(
            wait_gone(pid, STOP_TIMEOUT),
            "watchdog killed the orphaned server"
        );
    }

    #[test]
    fn cluster_of_three_becomes_healthy_and_survives_a_node_restart() {
        let mut cluster = NatsCluster::start().expect("start cluster");
        assert_eq!(cluster.urls().split(',').count(), CLUSTER_SIZE);
        cluster.node_mut(1).kill();
        assert!(!cluster.nodes()[1].is_running());
        cluster.node_mut(1).restart().expect("restart node");
        cluster.wait_healthy().expect("healthy again");
        assert_eq!(cluster.index_of("n2"), Some(1));
    }
}
