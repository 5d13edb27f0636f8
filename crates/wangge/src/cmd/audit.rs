//! `wangge audit ...`: what an inspector runs against the event log.
//!
//! WHY read the streams and not the read models: an audit must not trust anything derived.
//! Every command here opens the streams without creating or changing them
//! (`EventStore::open_existing`), so it runs with the read-only auditor credential, and reads
//! the commits themselves. `timeline` and `verify` check every commit's hash and its link to
//! the one before; `export` only decodes, so run `verify` for the chains.

use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use eventstore::{
    AggregateId, BoundedContext, EventCodec, EventStore, RecordedCommit, ReplayRange, SavedHeads,
    StreamSpec,
};
use serde_json::{Value, json};

use super::instant::{format_at, format_ms, format_offset, parse_instant};
use crate::config::Settings;

/// Commits between two progress lines on stderr.
const PROGRESS_EVERY_COMMITS: u64 = 10_000;
/// Messages per pull request while exporting.
const EXPORT_BATCH_MAX: usize = 1_000;

const AUDIT_HELP: &str = "\
The audit commands only read: they open the existing streams (GRIDS, INCIDENTS, INTAKE)
without creating or changing them, so they run with the read-only auditor user of
deploy/nats/accounts.conf:

    export WANGGE_NATS__USER=auditor WANGGE_NATS__PASSWORD=… WANGGE_NATS__INBOX_PREFIX=_INBOX_auditor

(or a credentials file: `[nats] credentials`, WANGGE_NATS__CREDENTIALS). Examples:

    wangge audit timeline 0193f1c2-7d1e-7a40-9a8e-2f0c1d9b7e55
    wangge audit verify --json > verify.json          # exit 3 when the log is not intact
    wangge audit verify --save-heads heads-2026-11.json              # keep the file off the servers
    wangge audit verify --check-heads heads-2026-11.json --save-heads heads-2026-12.json
    wangge audit export --since 2026-11-01T00:00:00+08:00 --until 2026-12-01T00:00:00+08:00 > nov.jsonl

Times are RFC 3339 with their UTC offset (Z for UTC, +08:00 for China); a time without one
is refused. Export prints on stderr the range it resolved, in UTC.";

/// Audit the event log: incident timelines, hash-chain verification, JSON-lines export.
#[derive(Debug, clap::Subcommand)]
#[command(after_long_help = AUDIT_HELP)]
pub enum AuditCommand {
    /// Every event of one incident in order: time, actor, what happened, why, whom it concerned.
    ///
    /// Reads the incident's commits from INCIDENTS to the end known when it starts and checks
    /// that each commit links to the one before (the hash chain). Content hashes of the whole
    /// log are checked by `wangge audit verify`.
    Timeline(TimelineArgs),
    /// Walk every aggregate's hash chain in the streams; report edited, forged, reordered or
    /// missing commits.
    ///
    /// The hashes are plain SHA-256, so someone who can write the streams could rewrite a
    /// history and recompute its hashes; a walk alone cannot see that. Save the chain heads a
    /// walk saw (`--save-heads`) where the log's operators cannot change them, and check a
    /// later walk against them (`--check-heads`): any change at or before a saved head shows,
    /// and so does a commit put in among the old ones (one the heads do not cover, standing
    /// before one they name).
    ///
    /// Exit status: 0 every stream checked and intact; 3 checked, and the log is not intact
    /// (the findings are printed); 1 the check could not be made or finished (no connection,
    /// a missing stream, a read that stalled, an unreadable heads file), so nothing is
    /// concluded; 2 bad settings.
    Verify(VerifyArgs),
    /// Decoded events as JSON lines (one event per line) for external tools.
    ///
    /// Ranges by the time the server stored each commit; each line also carries the decision
    /// time (`occurred_at`) from the envelope. Export decodes what is stored and does not check
    /// hashes, links or missing sequences: an edited or forged commit is exported as it is.
    /// Run `wangge audit verify` over the same streams to know whether the log is intact.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct TimelineArgs {
    /// The incident id (UUID, as in the receipt).
    #[arg(value_parser = parse_incident_id)]
    pub incident: uuid::Uuid,
    /// Print JSON instead of text (times always in UTC).
    #[arg(long)]
    pub json: bool,
    /// Print times in UTC. Without it the text shows them at the city's offset from UTC (the
    /// `utc_offset` of its business calendar, +08:00 in China).
    #[arg(long)]
    pub utc: bool,
}

/// An incident id, checked before anything connects.
fn parse_incident_id(text: &str) -> Result<uuid::Uuid, String> {
    text.trim()
        .parse()
        .map_err(|error| format!("not an incident id (a UUID, as in the receipt): {error}"))
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Streams to check (default: all three).
    #[arg(long = "stream", value_enum)]
    pub streams: Vec<StreamName>,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also check that each aggregate's history up to the chain head saved in this file (by
    /// an earlier `--save-heads`) is unchanged. Every checked stream must be in the file.
    #[arg(long, value_name = "FILE")]
    pub check_heads: Option<PathBuf>,
    /// When the log is intact, save every aggregate's chain head (newest version and hash)
    /// to this file (JSON, replaced whole) and print its SHA-256. Nothing is saved for a log
    /// that is not intact.
    #[arg(long, value_name = "FILE")]
    pub save_heads: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// First instant, RFC 3339 with its UTC offset (2026-11-01T00:00:00+08:00 or
    /// 2026-10-31T16:00:00Z; a time without an offset is refused); default: the beginning.
    #[arg(long, value_name = "TIME", value_parser = parse_instant)]
    pub since: Option<i64>,
    /// Instant to stop before, RFC 3339 with its UTC offset like --since; default: the end of
    /// each stream when export starts.
    #[arg(long, value_name = "TIME", value_parser = parse_instant)]
    pub until: Option<i64>,
    /// Streams to export (default: all three, in the order grids, incidents, intake).
    #[arg(long = "stream", value_enum)]
    pub streams: Vec<StreamName>,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamName {
    Grids,
    Incidents,
    Intake,
}

impl StreamName {
    const ALL: [StreamName; 3] = [StreamName::Grids, StreamName::Incidents, StreamName::Intake];

    fn context(self) -> BoundedContext {
        match self {
            StreamName::Grids => BoundedContext::Grids,
            StreamName::Incidents => BoundedContext::Incidents,
            StreamName::Intake => BoundedContext::Intake,
        }
    }
}

/// The streams named (each once, in the order first named), or all of them.
fn chosen(streams: &[StreamName]) -> Vec<StreamName> {
    if streams.is_empty() {
        StreamName::ALL.to_vec()
    } else {
        let mut once = Vec::with_capacity(streams.len());
        for stream in streams {
            if !once.contains(stream) {
                once.push(*stream);
            }
        }
        once
    }
}

fn spec(settings: &Settings, stream: StreamName) -> StreamSpec {
    StreamSpec::for_context(
        stream.context(),
        settings.store.replicas,
        Duration::from_secs(settings.store.duplicate_window_seconds),
    )
}

async fn open<C: EventCodec>(
    settings: &Settings,
    client: &async_nats::Client,
    stream: StreamName,
    codec: C,
) -> anyhow::Result<EventStore<C>> {
    let spec = spec(settings, stream);
    let name = spec.stream_name.clone();
    EventStore::open_existing(async_nats::jetstream::new(client.clone()), spec, codec)
        .await
        .with_context(|| format!("open stream {name} (does it exist? `wangge up` creates it)"))
}

pub fn run(settings: &Settings, command: AuditCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let client = super::serve::connect(settings, "audit").await?;
        match command {
            AuditCommand::Timeline(args) => timeline(settings, &client, args).await,
            AuditCommand::Verify(args) => verify(settings, &client, args).await,
            AuditCommand::Export(args) => export(settings, &client, args).await,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// timeline

async fn timeline(
    settings: &Settings,
    client: &async_nats::Client,
    args: TimelineArgs,
) -> anyhow::Result<()> {
    let incident = args.incident;
    let store = open(
        settings,
        client,
        StreamName::Incidents,
        codecs::IncidentCodec,
    )
    .await?;
    // Intake writes incidents under the bare hyphenated UUID; older layouts are tried too.
    let mut loaded = None;
    for candidate in [
        incident.hyphenated().to_string(),
        incident.simple().to_string(),
    ] {
        let aggregate = AggregateId::new(candidate.clone())
            .with_context(|| format!("aggregate id {candidate}"))?;
        let found = store.inspect(&aggregate).await.with_context(|| {
            format!(
                "load incident {incident} (a commit that does not decode is named by \
                 `wangge audit verify --stream incidents`)"
            )
        })?;
        if !found.commits.is_empty() {
            loaded = Some((aggregate, found));
            break;
        }
    }
    let Some((aggregate, loaded)) = loaded else {
        anyhow::bail!("incident {incident} has no events in stream INCIDENTS");
    };
    let chain = &loaded.breaks;
    // The city's policy gives the local offset and the departments' names. A timeline is
    // still worth printing without them (UTC, ids only), so a policy that does not load is a
    // warning here, not an error.
    let policy = match settings.policy() {
        Ok(policy) => Some(policy),
        Err(error) => {
            eprintln!("warning: {error:#}; times in UTC, departments by id");
            None
        }
    };
    let utc_offset_ms = match (&policy, args.utc || args.json) {
        (Some(policy), false) => policy.calendar.utc_offset_ms(),
        _ => 0,
    };
    let entries = timeline_entries(&loaded.commits, utc_offset_ms, policy.as_ref());
    let departments = concerned_departments(&entries, policy.as_ref());
    let mut out = std::io::stdout().lock();
    if args.json {
        let document = json!({
            "incident": incident,
            "subject": store.subject(&aggregate),
            "commits": loaded.commits.len(),
            "chain_intact": chain.is_empty(),
            "chain_breaks": chain,
            "departments": departments,
            "events": entries,
        });
        serde_json::to_writer_pretty(&mut out, &document).context("write JSON")?;
        writeln!(out)?;
    } else {
        write!(
            out,
            "{}",
            render_timeline(
                &incident.to_string(),
                &entries,
                chain,
                &departments,
                utc_offset_ms
            )
        )?;
    }
    Ok(())
}

/// The names of the departments the entries concern (`department:<id>`), from the city's
/// routing table, by id.
fn concerned_departments(
    entries: &[Value],
    policy: Option<&domain::Policy>,
) -> std::collections::BTreeMap<String, Value> {
    let mut named = std::collections::BTreeMap::new();
    let Some(policy) = policy else {
        return named;
    };
    for entry in entries {
        for concern in entry["concerns"].as_array().into_iter().flatten() {
            let Some(id) = concern
                .as_str()
                .and_then(|concern| concern.strip_prefix("department:"))
            else {
                continue;
            };
            let Ok(department_id) = id.parse() else {
                continue;
            };
            if let Some(department) = policy.routing.department(department_id) {
                named.insert(
                    id.to_owned(),
                    json!({ "name_zh": department.name_zh, "name_en": department.name_en }),
                );
            }
        }
    }
    named
}

/// One event of a timeline, as printed and as exported, its times at `utc_offset_ms`, its
/// departments named as the city's routing table names them.
fn timeline_entries(
    commits: &[RecordedCommit<domain::IncidentEvent>],
    utc_offset_ms: i64,
    policy: Option<&domain::Policy>,
) -> Vec<Value> {
    let department_name = |id: domain::DepartmentId| {
        policy
            .and_then(|policy| policy.routing.department(id))
            .map(|department| department.name_zh.clone())
    };
    let mut entries = Vec::new();
    for commit in commits {
        for recorded in &commit.events {
            let description =
                domain::describe::describe_named(&recorded.event, utc_offset_ms, &department_name);
            entries.push(json!({
                "version": recorded.version,
                "sequence": commit.sequence,
                "occurred_at": format_at(commit.meta.occurred_at_ms, utc_offset_ms),
                "stored_at": format_at(commit.stored_at_ms, utc_offset_ms),
                "actor": commit.meta.actor,
                // Who the event names as deciding it (the resident who reported, in a filing
                // commit intake wrote): `null` for what the clock decided.
                "by": recorded.event.by().map(|by| format!("{}/{}", by.role, by.id)),
                "command_id": commit.command_id,
                "correlation_id": commit.meta.correlation_id,
                "event_id": recorded.event_id,
                "kind": description.kind,
                "summary": description.summary,
                "reason": description.reason,
                "concerns": description.concerns,
            }));
        }
    }
    entries
}

fn render_timeline(
    incident: &str,
    entries: &[Value],
    chain: &[eventstore::ChainBreak],
    departments: &std::collections::BTreeMap<String, Value>,
    utc_offset_ms: i64,
) -> String {
    let zone = if utc_offset_ms == 0 {
        "times in UTC".to_owned()
    } else {
        format!(
            "times at UTC{}, the city's offset; --utc for UTC",
            format_offset(utc_offset_ms)
        )
    };
    let mut text = format!("Incident {incident}: {} events ({zone})\n\n", entries.len());
    for entry in entries {
        let field = |name: &str| entry[name].as_str().unwrap_or("").to_owned();
        text.push_str(&format!(
            "{:>3}  {}  {}\n     {}\n",
            entry["version"],
            field("occurred_at"),
            field("actor"),
            field("summary"),
        ));
        if let Some(by) = entry["by"].as_str()
            && by != field("actor")
        {
            text.push_str(&format!("     by: {by}\n"));
        }
        if let Some(reason) = entry["reason"].as_str() {
            text.push_str(&format!("     reason: {reason}\n"));
        }
        let concerns: Vec<String> = entry["concerns"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(|concern| {
                        let name = concern
                            .strip_prefix("department:")
                            .and_then(|id| departments.get(id))
                            .and_then(|named| named["name_zh"].as_str());
                        match name {
                            Some(name) => format!("{concern} ({name})"),
                            None => concern.to_owned(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !concerns.is_empty() {
            text.push_str(&format!("     concerns: {}\n", concerns.join(", ")));
        }
    }
    if chain.is_empty() {
        text.push_str(
            "\nHash chain: every commit links to the one before it. (Commits deleted after the \
             last one shown would not show here: `wangge audit verify` checks the whole log.)\n",
        );
    } else {
        text.push_str(&format!(
            "\nHash chain: {} BROKEN link(s); the events above are as stored, not as decided:\n",
            chain.len()
        ));
        for broken in chain {
            text.push_str(&format!(
                "  at stream sequence {} (version {}): {}\n",
                broken.sequence, broken.version, broken.detail
            ));
        }
        text.push_str("Run `wangge audit verify` for the whole log.\n");
    }
    text
}

// ---------------------------------------------------------------------------------------------
// verify

/// Format tag of a chain-heads file (`--save-heads`), checked when one is read.
const HEADS_FORMAT: &str = "wangge-chain-heads/1";
/// Largest chain-heads file read (about 6 million aggregates).
const HEADS_FILE_BYTES_MAX: u64 = 1 << 30;

/// What `audit verify --save-heads` writes: each checked stream's chain heads.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HeadsFile {
    format: String,
    /// When the walk that saw the heads ended (UTC).
    saved_at: String,
    streams: Vec<StreamHeads>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StreamHeads {
    stream: String,
    last_sequence: u64,
    heads: Vec<eventstore::ChainHead>,
}

/// Reads and checks a chain-heads file: the saved heads by stream name (a stream listed twice
/// is refused).
fn read_heads(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, SavedHeads>> {
    let context = || format!("read the chain heads in {}", path.display());
    let size = std::fs::metadata(path).with_context(context)?.len();
    anyhow::ensure!(
        size <= HEADS_FILE_BYTES_MAX,
        "read the chain heads in {}: {size} bytes, more than the {HEADS_FILE_BYTES_MAX} a \
         heads file may have",
        path.display()
    );
    let text = std::fs::read(path).with_context(context)?;
    let file: HeadsFile = serde_json::from_slice(&text).with_context(context)?;
    anyhow::ensure!(
        file.format == HEADS_FORMAT,
        "read the chain heads in {}: format {:?}, expected {HEADS_FORMAT:?}",
        path.display(),
        file.format
    );
    let mut by_stream = std::collections::BTreeMap::new();
    for stream in file.streams {
        let saved = SavedHeads::new(stream.heads)
            .map_err(|reason| anyhow::anyhow!("{reason}"))
            .with_context(|| {
                format!(
                    "read the chain heads of {} in {}",
                    stream.stream,
                    path.display()
                )
            })?;
        anyhow::ensure!(
            by_stream.insert(stream.stream.clone(), saved).is_none(),
            "read the chain heads in {}: stream {} is listed twice",
            path.display(),
            stream.stream
        );
    }
    Ok(by_stream)
}

/// Writes `file` beside `path` and renames it over `path`, so a crash leaves the old file or
/// the new one, never half of one; returns the SHA-256 of what was written.
fn write_heads(path: &std::path::Path, file: &HeadsFile) -> anyhow::Result<String> {
    use sha2::Digest as _;
    let context = || format!("save the chain heads to {}", path.display());
    let mut text = serde_json::to_vec_pretty(file).with_context(context)?;
    text.push(b'\n');
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, &text).with_context(context)?;
    std::fs::rename(&temporary, path).with_context(context)?;
    Ok(hex::encode(sha2::Sha256::digest(&text)))
}

async fn verify(
    settings: &Settings,
    client: &async_nats::Client,
    args: VerifyArgs,
) -> anyhow::Result<()> {
    let streams = chosen(&args.streams);
    // The heads file is read before any stream, so a bad file costs no walk.
    let mut saved_by_stream = match &args.check_heads {
        Some(path) => {
            let by_stream = read_heads(path)?;
            for stream in &streams {
                let name = spec(settings, *stream).stream_name;
                anyhow::ensure!(
                    by_stream.contains_key(&name),
                    "the chain heads in {} do not cover stream {name} (they cover {}); check \
                     only the streams they cover with --stream",
                    path.display(),
                    by_stream.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            Some(by_stream)
        }
        None => None,
    };
    let mut reports = Vec::new();
    let mut unchecked: Vec<String> = Vec::new();
    for stream in streams {
        let progress = |checked: u64, sequence: u64| {
            eprintln!("  {stream:?}: {checked} commits checked (sequence {sequence})");
        };
        let saved = saved_by_stream
            .as_mut()
            .and_then(|by_stream| by_stream.remove(&spec(settings, stream).stream_name))
            .unwrap_or_default();
        // A stream that cannot be opened or read does not hide what the others showed: every
        // report is printed, the streams not checked are named, and findings anywhere still
        // give the exit status of a log that is not intact.
        let verified: anyhow::Result<_> = async {
            Ok(match stream {
                StreamName::Grids => {
                    open(settings, client, stream, registry::RegistryCodec)
                        .await?
                        .verify_against(&saved, progress)
                        .await?
                }
                StreamName::Incidents => {
                    open(settings, client, stream, codecs::IncidentCodec)
                        .await?
                        .verify_against(&saved, progress)
                        .await?
                }
                StreamName::Intake => {
                    open(
                        settings,
                        client,
                        stream,
                        intake::IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
                    )
                    .await?
                    .verify_against(&saved, progress)
                    .await?
                }
            })
        }
        .await;
        match verified {
            Ok(report) => reports.push(report),
            Err(error) => {
                let error = error.context(format!("verify stream {stream:?}"));
                eprintln!("not checked: {error:#}");
                unchecked.push(format!("{stream:?}"));
            }
        }
    }
    let findings: u64 = reports.iter().map(|report| report.findings_total).sum();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &reports).context("write JSON")?;
        writeln!(out)?;
    } else {
        for report in &reports {
            writeln!(
                out,
                "{}: {} commits of {} aggregates, last sequence {}: {}",
                report.stream,
                report.commits_checked,
                report.aggregates,
                report.last_sequence,
                if report.is_intact() {
                    "intact".to_owned()
                } else {
                    format!("{} FINDINGS", report.findings_total)
                }
            )?;
            if let Some(checked) = report.saved_heads_checked {
                writeln!(out, "  checked against {checked} saved chain heads")?;
            }
            for finding in &report.findings {
                writeln!(out, "  {}", serde_json::to_string(finding)?)?;
            }
            let unlisted = report
                .findings_total
                .saturating_sub(report.findings.len() as u64);
            if unlisted > 0 {
                writeln!(
                    out,
                    "  ... and {unlisted} more finding(s), counted but not listed (a walk lists \
                     the first {})",
                    report.findings.len()
                )?;
            }
        }
    }
    out.flush()?;
    if findings > 0 {
        if let Some(path) = &args.save_heads {
            eprintln!(
                "chain heads not saved to {}: the log is not intact",
                path.display()
            );
        }
        if !unchecked.is_empty() {
            eprintln!("not checked: {}", unchecked.join(", "));
        }
        return Err(NotIntact { findings }.into());
    }
    anyhow::ensure!(
        unchecked.is_empty(),
        "stream(s) {} could not be checked (see above); nothing is concluded about them{}",
        unchecked.join(", "),
        if args.save_heads.is_some() {
            "; chain heads not saved"
        } else {
            ""
        }
    );
    if let Some(path) = &args.save_heads {
        let saved_at = format_ms(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| {
                    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
                }),
        );
        let file = HeadsFile {
            format: HEADS_FORMAT.to_owned(),
            saved_at,
            streams: reports
                .into_iter()
                .map(|report| StreamHeads {
                    stream: report.stream,
                    last_sequence: report.last_sequence,
                    heads: report.heads,
                })
                .collect(),
        };
        let aggregates: usize = file.streams.iter().map(|stream| stream.heads.len()).sum();
        let digest = write_heads(path, &file)?;
        eprintln!(
            "saved the chain heads of {aggregates} aggregates in {} stream(s) to {}; its \
             SHA-256 is {digest}. Keep the file, or at least this digest, where the log's \
             operators cannot change it, and check later walks with --check-heads.",
            file.streams.len(),
            path.display()
        );
    }
    Ok(())
}

/// `audit verify` checked the log and found it not intact. `main` exits with
/// [`EXIT_NOT_INTACT`] for it, so a script can tell "the log was tampered with" from "the
/// check could not be made" (exit 1), which both used to be 1.
#[derive(Debug)]
pub struct NotIntact {
    pub findings: u64,
}

/// Exit status of `audit verify` when the log is not intact.
pub const EXIT_NOT_INTACT: u8 = 3;

impl std::fmt::Display for NotIntact {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "the event log is not intact: {} findings",
            self.findings
        )
    }
}

impl std::error::Error for NotIntact {}

// ---------------------------------------------------------------------------------------------
// export

async fn export(
    settings: &Settings,
    client: &async_nats::Client,
    args: ExportArgs,
) -> anyhow::Result<()> {
    let (since_ms, until_ms) = (args.since, args.until);
    if let (Some(since), Some(until)) = (since_ms, until_ms) {
        anyhow::ensure!(since < until, "--since must be before --until");
    }
    // The options carry their offsets; say in UTC what they came to, which is what the
    // lines' `stored_at` will show.
    eprintln!(
        "exporting commits stored from {} to {}",
        since_ms.map_or("the beginning".to_owned(), format_ms),
        until_ms.map_or("the end of each stream".to_owned(), |ms| format!(
            "before {}",
            format_ms(ms)
        )),
    );
    let mut out: Box<dyn std::io::Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match export_streams(
        settings,
        client,
        &args.streams,
        since_ms,
        until_ms,
        &mut out,
    )
    .await
    {
        Ok(total) => {
            eprintln!("{total} events exported");
            Ok(())
        }
        // The reader went away (`wangge audit export | head`): it has what it wanted, and
        // nothing more is read. Not an error, as for any Unix filter.
        Err(error) if is_broken_pipe(&error) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Exports each chosen stream in turn and flushes; returns the number of events written.
async fn export_streams(
    settings: &Settings,
    client: &async_nats::Client,
    streams: &[StreamName],
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    out: &mut Box<dyn std::io::Write>,
) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for stream in chosen(streams) {
        let exported = match stream {
            StreamName::Grids => {
                let store = open(settings, client, stream, registry::RegistryCodec).await?;
                export_stream(&store, since_ms, until_ms, out, registry_event_json).await
            }
            StreamName::Incidents => {
                let store = open(settings, client, stream, codecs::IncidentCodec).await?;
                export_stream(&store, since_ms, until_ms, out, incident_event_json).await
            }
            StreamName::Intake => {
                let codec = intake::IntakeCodec::new(intake::INTAKE_EVENT_TYPE);
                let store = open(settings, client, stream, codec).await?;
                export_stream(&store, since_ms, until_ms, out, |event| {
                    serde_json::to_value(event).unwrap_or(Value::Null)
                })
                .await
            }
        }
        .with_context(|| format!("export stream {stream:?}"))?;
        eprintln!("{stream:?}: {exported} events exported");
        total += exported;
    }
    out.flush().context("flush the export")?;
    Ok(total)
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes every event of `store` stored in `[since, until)` as one JSON line; returns the count.
async fn export_stream<C: EventCodec>(
    store: &EventStore<C>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    out: &mut Box<dyn std::io::Write>,
    event_json: impl Fn(&C::Event) -> Value,
) -> anyhow::Result<u64> {
    let last = store.last_sequence().await?;
    let after_sequence = match since_ms {
        None => 0,
        Some(since) => match store.first_sequence_since(since).await? {
            Some(first) => first - 1,
            None => return Ok(0),
        },
    };
    let until_sequence = match until_ms {
        None => last,
        Some(until) => match store.first_sequence_since(until).await? {
            Some(first) => first - 1,
            None => last,
        },
    };
    let stream_name = store.spec().stream_name.clone();
    let mut exported = 0u64;
    let mut commits = 0u64;
    let mut write_error = None;
    store
        .replay_until_break(
            ReplayRange {
                after_sequence,
                until_sequence: Some(until_sequence),
                batch_max: EXPORT_BATCH_MAX,
            },
            |commit| {
                for line in export_lines(&stream_name, &commit, &event_json) {
                    if let Err(error) = serde_json::to_writer(&mut *out, &line)
                        .map_err(std::io::Error::from)
                        .and_then(|()| out.write_all(b"\n"))
                    {
                        // Stop reading: whatever follows could not be written either.
                        write_error = Some(error);
                        return ControlFlow::Break(());
                    }
                    exported += 1;
                }
                commits += 1;
                if commits.is_multiple_of(PROGRESS_EVERY_COMMITS) {
                    eprintln!(
                        "  {stream_name}: {commits} commits (sequence {} of {until_sequence})",
                        commit.sequence
                    );
                }
                ControlFlow::Continue(())
            },
        )
        .await?;
    if let Some(error) = write_error {
        return Err(error).context("write the export");
    }
    Ok(exported)
}

fn export_lines<E>(
    stream: &str,
    commit: &RecordedCommit<E>,
    event_json: &impl Fn(&E) -> Value,
) -> Vec<Value> {
    commit
        .events
        .iter()
        .map(|recorded| {
            json!({
                "stream": stream,
                "sequence": commit.sequence,
                "aggregate": commit.aggregate.as_str(),
                "version": recorded.version,
                "event_id": recorded.event_id,
                "event_type": recorded.event_type,
                "command_id": commit.command_id,
                "actor": commit.meta.actor,
                "correlation_id": commit.meta.correlation_id,
                "causation_id": commit.meta.causation_id,
                "occurred_at": format_ms(commit.meta.occurred_at_ms),
                "stored_at": format_ms(commit.stored_at_ms),
                "hash": hex::encode(commit.hash),
                "previous_hash": hex::encode(commit.previous_hash),
                "event": event_json(&recorded.event),
            })
        })
        .collect()
}

fn incident_event_json(event: &domain::IncidentEvent) -> Value {
    let description = domain::describe::describe(event);
    json!({
        "kind": description.kind,
        "summary": description.summary,
        "data": serde_json::to_value(event).unwrap_or(Value::Null),
    })
}

fn ring(ring: &geo::LineString<f64>) -> Value {
    Value::Array(ring.coords().map(|c| json!([c.x, c.y])).collect())
}

fn polygon(polygon: &geo::Polygon<f64>) -> Value {
    let mut rings = vec![ring(polygon.exterior())];
    rings.extend(polygon.interiors().iter().map(ring));
    Value::Array(rings)
}

/// Registry events carry geometry; it is exported as GeoJSON coordinate arrays (lon, lat).
fn registry_event_json(event: &registry::domain::Event) -> Value {
    use registry::domain::Event;
    match event {
        Event::CommunityRegistered {
            profile,
            registered_at_ms,
        } => json!({
            "kind": "community_registered",
            "code": profile.code, "name": profile.name, "street": profile.street,
            "district": profile.district,
            "registered_at": format_ms(*registered_at_ms),
            "boundary": {"type": "MultiPolygon",
                "coordinates": profile.boundary.0.iter().map(polygon).collect::<Vec<_>>()},
        }),
        Event::CommunityUpdated { profile } => json!({
            "kind": "community_updated",
            "code": profile.code, "name": profile.name, "street": profile.street,
            "district": profile.district,
            "boundary": {"type": "MultiPolygon",
                "coordinates": profile.boundary.0.iter().map(polygon).collect::<Vec<_>>()},
        }),
        Event::BuildingsImported {
            buildings,
            rejected,
        } => json!({
            "kind": "buildings_imported",
            "buildings": buildings.iter().map(|building| json!({
                "id": building.id,
                "lon": building.position.x(), "lat": building.position.y(),
                "households": building.households, "population": building.population,
            })).collect::<Vec<_>>(),
            "rejected": rejected,
        }),
        Event::GridsDrawn {
            mode,
            drawn,
            retired,
            unchanged,
        } => json!({
            "kind": "grids_drawn",
            "mode": mode,
            "drawn": drawn.iter().map(|grid| json!({
                "grid_code": grid.grid_code,
                "households": grid.households,
                "population": grid.population,
                "buildings": grid.members,
                "flags": grid.flags,
                "polygon": {"type": "Polygon", "coordinates": polygon(&grid.polygon)},
                "detached": grid.detached.iter().map(polygon).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "retired": retired,
            "unchanged": unchanged,
        }),
        Event::GridWorkerAssigned {
            grid_code,
            worker,
            assigned_at_ms,
        } => json!({
            "kind": "grid_worker_assigned",
            "grid_code": grid_code,
            "worker": worker,
            "assigned_at": format_ms(*assigned_at_ms),
        }),
    }
}
