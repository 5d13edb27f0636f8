//! `wangge audit timeline|verify|export` against a real nats-server, and `verify` finding a
//! commit edited on the server's disk (the insider the hash chain exists for).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use domain::incident::{Action, IncidentCommand};
use domain::{Actor, ActorId, IncidentId, Policy, Role, Timestamp, decide};
use eventstore::{
    AggregateId, BoundedContext, Commit, CommitMeta, EventStore, Position, StreamSpec,
};
use expect_test::expect;

/// Monday 2026-11-23 02:00 UTC: 10:00 in Sanming (UTC+8), inside working hours.
const MONDAY_1000_SANMING_MS: i64 = 1_795_399_200_000;
const RESOLVE_NOTE: &str = "refilled the pothole and rolled it flat";

fn audit_command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wangge"));
    command
        .arg("audit")
        .args(args)
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_NATS__URL", url)
        .env("WANGGE_LOG__FILTER", "warn");
    command
}

fn audit(url: &str, args: &[&str]) -> Output {
    audit_command(url, args).output().expect("run wangge audit")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes one incident's life, one commit per command, at fixed times and actors; the last
/// commit resolves it with `resolve_note`.
async fn write_incident(url: &str, incident: IncidentId, resolve_note: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let store = EventStore::open(
        async_nats::jetstream::new(client),
        StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120)),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    let policy = Policy::embedded("sanming").unwrap();
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
    let chengguan = Role::Department("chengguan".parse().unwrap());
    let steps: Vec<(i64, Role, &str, Vec<Action>)> = vec![
        (
            0,
            Role::Resident,
            "intake",
            vec![
                Action::Report {
                    incident,
                    description: "路面坑洼，雨后积水".to_owned(),
                    position: None,
                    category_hint: None,
                },
                Action::File {
                    grid: "350402001002007".parse().unwrap(),
                    category: "0102".parse().unwrap(),
                },
            ],
        ),
        (
            1,
            Role::System,
            "dispatch",
            vec![Action::Dispatch { to: None }],
        ),
        (
            30,
            chengguan,
            "console-acknowledge",
            vec![Action::Acknowledge],
        ),
        (
            200,
            chengguan,
            "console-resolve",
            vec![Action::Resolve {
                note: resolve_note.to_owned(),
            }],
        ),
    ];
    let mut state = domain::IncidentState::default();
    let mut position = Position::NEW;
    for (minutes, role, command_id, actions) in steps {
        let now = Timestamp(MONDAY_1000_SANMING_MS + minutes * 60_000);
        let mut events = Vec::new();
        for (n, action) in actions.into_iter().enumerate() {
            // Intake files as the system after the resident's report.
            let role = if n == 1 { Role::System } else { role };
            let actor = Actor {
                role,
                id: ActorId(uuid::Uuid::from_u128(42)),
            };
            for event in decide(&state, IncidentCommand { actor, action }, now, &policy).unwrap() {
                state.apply(&event);
                events.push(event);
            }
        }
        let meta = CommitMeta {
            correlation_id: uuid::Uuid::from_u128(1),
            causation_id: uuid::Uuid::from_u128(2),
            actor: format!("{role}/{command_id}"),
            occurred_at_ms: now.0,
            traceparent: None,
        };
        position = store
            .append(
                &aggregate,
                &position,
                &Commit::new(command_id, events, meta),
            )
            .await
            .unwrap()
            .position;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_verify_export_and_a_tampered_disk() {
    let mut server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let incident = IncidentId(uuid::Uuid::from_u128(
        0x0193_f1c2_7d1e_7a40_9a8e_2f0c_1d9b_7e55,
    ));
    write_incident(&url, incident, RESOLVE_NOTE).await;

    let timeline = audit(&url, &["timeline", &incident.0.to_string()]);
    assert!(timeline.status.success(), "{}", text(&timeline.stderr));
    expect![[r#"
        Incident 0193f1c2-7d1e-7a40-9a8e-2f0c1d9b7e55: 5 events (times at UTC+08:00, the city's offset; --utc for UTC)

        1  2026-11-23T10:00:00.000+08:00  resident/intake
             Incident 0193f1c2-7d1e-7a40-9a8e-2f0c1d9b7e55 reported: "路面坑洼，雨后积水"
             by: resident/00000000-0000-0000-0000-00000000002a
        2  2026-11-23T10:00:00.000+08:00  resident/intake
             Filed in grid 350402001002007 as category 0102
             by: system/00000000-0000-0000-0000-00000000002a
        3  2026-11-23T10:01:00.000+08:00  system/dispatch
             Assigned to department chengguan [城市管理局(城市管理综合执法)] (by the routing table); respond by 2026-11-23T13:31:00+08:00, resolve by 2026-11-25T10:01:00+08:00
             by: system/00000000-0000-0000-0000-00000000002a
             concerns: department:chengguan (城市管理局(城市管理综合执法))
        4  2026-11-23T10:30:00.000+08:00  department:chengguan/console-acknowledge
             Handler acknowledged the case
             by: department:chengguan/00000000-0000-0000-0000-00000000002a
        5  2026-11-23T13:20:00.000+08:00  department:chengguan/console-resolve
             Handler reported the case resolved
             by: department:chengguan/00000000-0000-0000-0000-00000000002a
             reason: refilled the pothole and rolled it flat

        Hash chain: every commit links to the one before it. (Commits deleted after the last one shown would not show here: `wangge audit verify` checks the whole log.)
    "#]]
    .assert_eq(&text(&timeline.stdout));

    let utc = audit(&url, &["timeline", "--utc", &incident.0.to_string()]);
    assert!(utc.status.success(), "{}", text(&utc.stderr));
    let utc = text(&utc.stdout);
    assert!(
        utc.starts_with("Incident 0193f1c2-7d1e-7a40-9a8e-2f0c1d9b7e55: 5 events (times in UTC)\n")
            && utc.contains("respond by 2026-11-23T05:31:00Z"),
        "{utc}"
    );
    let json = audit(&url, &["timeline", "--json", &incident.0.to_string()]);
    assert!(json.status.success(), "{}", text(&json.stderr));
    let document: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        document["events"][2]["occurred_at"],
        "2026-11-23T02:01:00.000Z"
    );
    expect![[r#"{"chengguan":{"name_en":"Urban Management Bureau (integrated enforcement)","name_zh":"城市管理局(城市管理综合执法)"}}"#]]
        .assert_eq(&document["departments"].to_string());

    let unknown = audit(&url, &["timeline", "0193f1c2-0000-7000-8000-000000000000"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).ends_with(
            "error: incident 0193f1c2-0000-7000-8000-000000000000 has no events in stream INCIDENTS\n"
        ),
        "{}",
        text(&unknown.stderr)
    );

    let verified = audit(&url, &["verify", "--stream", "incidents"]);
    assert!(verified.status.success(), "{}", text(&verified.stderr));
    expect![[r#"
        INCIDENTS: 4 commits of 1 aggregates, last sequence 4: intact
    "#]]
    .assert_eq(&text(&verified.stdout));

    let export = audit(&url, &["export", "--stream", "incidents"]);
    assert!(export.status.success(), "{}", text(&export.stderr));
    let kinds: Vec<String> = text(&export.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            format!(
                "{} v{} {} {}",
                value["sequence"], value["version"], value["occurred_at"], value["event"]["kind"]
            )
        })
        .collect();
    expect![[r#"
        1 v1 "2026-11-23T02:00:00.000Z" "reported"
        1 v2 "2026-11-23T02:00:00.000Z" "filed"
        2 v3 "2026-11-23T02:01:00.000Z" "dispatched"
        3 v4 "2026-11-23T02:30:00.000Z" "acknowledged"
        4 v5 "2026-11-23T05:20:00.000Z" "resolved""#]]
    .assert_eq(&kinds.join("\n"));
    // A window after the last commit exports nothing.
    let later = audit(
        &url,
        &[
            "export",
            "--stream",
            "incidents",
            "--since",
            "2099-01-01T00:00:00Z",
        ],
    );
    assert!(later.status.success(), "{}", text(&later.stderr));
    assert_eq!(text(&later.stdout), "");
    // A reader that goes away (`| head`) ends the export quietly: exit 0, no error.
    let mut closed = audit_command(&url, &["export", "--stream", "incidents"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wangge audit export");
    drop(closed.stdout.take());
    let closed = closed.wait_with_output().expect("wait for the export");
    assert_eq!(closed.status.code(), Some(0), "{}", text(&closed.stderr));
    assert!(
        !text(&closed.stderr).contains("error"),
        "{}",
        text(&closed.stderr)
    );
    // A time without an offset is refused before anything connects, not read as UTC.
    let zoneless = audit(
        &url,
        &[
            "export",
            "--stream",
            "incidents",
            "--since",
            "2026-11-23T10:00:00",
        ],
    );
    assert_eq!(
        zoneless.status.code(),
        Some(2),
        "{}",
        text(&zoneless.stderr)
    );
    assert!(
        text(&zoneless.stderr).contains("has no UTC offset: add Z for UTC"),
        "{}",
        text(&zoneless.stderr)
    );
    // With its offset, 10:00 in Sanming is 02:00 UTC, said on stderr (the range is of stored
    // times, so what it exports depends on when this test runs).
    let local = audit(
        &url,
        &[
            "export",
            "--stream",
            "incidents",
            "--since",
            "2026-11-23T10:00:00+08:00",
            "--until",
            "2026-11-23T10:30:00.5+08:00",
        ],
    );
    assert!(local.status.success(), "{}", text(&local.stderr));
    assert!(
        text(&local.stderr).contains(
            "exporting commits stored from 2026-11-23T02:00:00.000Z to before \
             2026-11-23T02:30:00.500Z"
        ),
        "{}",
        text(&local.stderr)
    );

    // The insider: stop the server, edit the resolve note in the stream's block file. The
    // server's own per-message checksum makes it drop the edited message on restart; the
    // audit sees the hole in the sequence (a forged re-publish, which the server accepts, is
    // found by the content hash: crates/eventstore/tests/conformance.rs).
    server.stop();
    let mut edited = 0;
    for entry in walk(server.store_dir()) {
        if entry
            .extension()
            .is_some_and(|extension| extension == "blk")
        {
            let mut bytes = std::fs::read(&entry).unwrap();
            let needle = RESOLVE_NOTE.as_bytes();
            if let Some(at) = bytes
                .windows(needle.len())
                .position(|window| window == needle)
            {
                bytes[at] = b'R'; // "refilled" -> "Refilled"
                std::fs::write(&entry, bytes).unwrap();
                edited += 1;
            }
        }
    }
    assert_eq!(edited, 1, "the resolve note is in exactly one block file");
    server.restart().unwrap();
    let tampered = audit(&url, &["verify", "--stream", "incidents", "--json"]);
    // 3: checked, and the log is not intact (1 would mean the check could not be made).
    assert_eq!(
        tampered.status.code(),
        Some(3),
        "verify must report a tampered log: {}",
        text(&tampered.stderr)
    );
    assert!(
        text(&tampered.stderr).ends_with("error: the event log is not intact: 1 findings\n"),
        "{}",
        text(&tampered.stderr)
    );
    let reports: serde_json::Value = serde_json::from_slice(&tampered.stdout).unwrap();
    expect![[r#"
        [
          {
            "from": 4,
            "kind": "missing_sequences",
            "to": 4
          }
        ]"#]]
    .assert_eq(&serde_json::to_string_pretty(&reports[0]["findings"]).unwrap());
}

/// The insider who can write the streams rewrites a history and recomputes its hashes (here:
/// the stream deleted and written again, one incident with another resolve note, the other
/// left out). A walk alone finds the new log intact; a walk checked against the chain heads
/// saved before finds both changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_chain_heads_reveal_a_rewritten_history() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let folder = tempfile::tempdir().unwrap();
    let heads = folder.path().join("heads.json");
    let heads_arg = heads.to_str().unwrap();
    let rewritten = IncidentId(uuid::Uuid::from_u128(
        0x0193_f1c2_7d1e_7a40_9a8e_0000_0000_0001,
    ));
    let dropped = IncidentId(uuid::Uuid::from_u128(
        0x0193_f1c2_7d1e_7a40_9a8e_0000_0000_0002,
    ));
    write_incident(&url, rewritten, RESOLVE_NOTE).await;
    write_incident(&url, dropped, RESOLVE_NOTE).await;

    let saving = audit(
        &url,
        &["verify", "--stream", "incidents", "--save-heads", heads_arg],
    );
    assert!(saving.status.success(), "{}", text(&saving.stderr));
    assert!(
        text(&saving.stderr).contains("saved the chain heads of 2 aggregates in 1 stream(s)"),
        "{}",
        text(&saving.stderr)
    );
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&heads).unwrap()).unwrap();
    assert_eq!(file["format"], "wangge-chain-heads/1");
    assert_eq!(file["streams"][0]["stream"], "INCIDENTS");
    assert_eq!(file["streams"][0]["last_sequence"], 8);
    let saved_heads = file["streams"][0]["heads"].as_array().unwrap();
    assert_eq!(saved_heads.len(), 2);
    assert!(saved_heads.iter().all(|head| head["version"] == 5));

    let unchanged = audit(
        &url,
        &[
            "verify",
            "--stream",
            "incidents",
            "--check-heads",
            heads_arg,
        ],
    );
    assert!(unchanged.status.success(), "{}", text(&unchanged.stderr));
    expect![[r#"
        INCIDENTS: 8 commits of 2 aggregates, last sequence 8: intact
          checked against 2 saved chain heads
    "#]]
    .assert_eq(&text(&unchanged.stdout));

    // Heads of a stream the file does not cover: refused before any walk (exit 1).
    let uncovered = audit(
        &url,
        &["verify", "--stream", "grids", "--check-heads", heads_arg],
    );
    assert_eq!(
        uncovered.status.code(),
        Some(1),
        "{}",
        text(&uncovered.stderr)
    );
    assert!(
        text(&uncovered.stderr).contains("do not cover stream GRIDS (they cover INCIDENTS)"),
        "{}",
        text(&uncovered.stderr)
    );

    let client = async_nats::connect(&url).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_stream("INCIDENTS")
        .await
        .unwrap();
    write_incident(&url, rewritten, "filled the pothole with gravel").await;
    // An incident appended after the rewrite: with `dropped`'s head never met, it is not
    // accused of having been slipped in before it (that head is reported missing instead).
    write_incident(
        &url,
        IncidentId(uuid::Uuid::from_u128(
            0x0193_f1c2_7d1e_7a40_9a8e_0000_0000_0003,
        )),
        RESOLVE_NOTE,
    )
    .await;

    let alone = audit(&url, &["verify", "--stream", "incidents"]);
    assert!(
        alone.status.success(),
        "the rewritten log is consistent in itself: {}",
        text(&alone.stderr)
    );

    let checked = audit(
        &url,
        &[
            "verify",
            "--stream",
            "incidents",
            "--json",
            "--check-heads",
            heads_arg,
            "--save-heads",
            heads_arg,
        ],
    );
    assert_eq!(checked.status.code(), Some(3), "{}", text(&checked.stderr));
    assert!(
        text(&checked.stderr).contains("chain heads not saved"),
        "a log that is not intact is never saved as the new reference: {}",
        text(&checked.stderr)
    );
    let reports: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(reports[0]["saved_heads_checked"], 2);
    let mut findings = reports[0]["findings"].clone();
    // The hashes differ from run to run (the commits carry random ids); the rest does not.
    findings[0]["detail"] = serde_json::Value::from(
        findings[0]["detail"]
            .as_str()
            .unwrap()
            .split(" has hash ")
            .next()
            .unwrap(),
    );
    expect![[r#"
        [
          {
            "aggregate": "0193f1c2-7d1e-7a40-9a8e-000000000001",
            "detail": "the commit of version 5",
            "kind": "head_changed",
            "sequence": 4,
            "version": 5
          },
          {
            "aggregate": "0193f1c2-7d1e-7a40-9a8e-000000000002",
            "found_version": 0,
            "kind": "head_missing",
            "version": 5
          }
        ]"#]]
    .assert_eq(&serde_json::to_string_pretty(&findings).unwrap());
    // The reference file is untouched.
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&heads).unwrap()).unwrap();
    assert_eq!(again, file);
}

/// A copied stream with a made-up incident put in before the old commits (hashes do not
/// cover the stream sequence, so every chain is intact in itself): the saved heads show it,
/// since in a log only appended to since they were saved, every commit they do not cover
/// comes after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_chain_heads_reveal_commits_slipped_in_before_them() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let folder = tempfile::tempdir().unwrap();
    let heads = folder.path().join("heads.json");
    let heads_arg = heads.to_str().unwrap();
    let genuine = IncidentId(uuid::Uuid::from_u128(
        0x0193_f1c2_7d1e_7a40_9a8e_0000_0000_0011,
    ));
    write_incident(&url, genuine, RESOLVE_NOTE).await;
    let saving = audit(
        &url,
        &["verify", "--stream", "incidents", "--save-heads", heads_arg],
    );
    assert!(saving.status.success(), "{}", text(&saving.stderr));

    // Copy the stream's messages out, recreate it with a made-up incident first, then put
    // the genuine commits back as they were.
    let jetstream = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut copied = Vec::new();
    {
        let stream = jetstream.get_stream("INCIDENTS").await.unwrap();
        let last = stream.cached_info().state.last_sequence;
        for sequence in 1..=last {
            copied.push(stream.get_raw_message(sequence).await.unwrap());
        }
    }
    jetstream.delete_stream("INCIDENTS").await.unwrap();
    let made_up = IncidentId(uuid::Uuid::from_u128(
        0x0193_f1c2_7d1e_7a40_9a8e_0000_0000_0012,
    ));
    write_incident(&url, made_up, "never happened").await;
    for message in copied {
        jetstream
            .publish_with_headers(
                message.subject.to_string(),
                copied_headers(&message.headers, ""),
                message.payload,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let alone = audit(&url, &["verify", "--stream", "incidents"]);
    assert!(
        alone.status.success(),
        "intact in itself: {}",
        text(&alone.stderr)
    );

    let checked = audit(
        &url,
        &[
            "verify",
            "--stream",
            "incidents",
            "--json",
            "--check-heads",
            heads_arg,
        ],
    );
    assert_eq!(checked.status.code(), Some(3), "{}", text(&checked.stderr));
    let reports: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    expect![[r#"
        [
          {
            "aggregate": "0193f1c2-7d1e-7a40-9a8e-000000000012",
            "heads_not_yet_met": 1,
            "kind": "added_before_saved_heads",
            "sequence": 1,
            "version": 2
          },
          {
            "aggregate": "0193f1c2-7d1e-7a40-9a8e-000000000012",
            "heads_not_yet_met": 1,
            "kind": "added_before_saved_heads",
            "sequence": 2,
            "version": 3
          },
          {
            "aggregate": "0193f1c2-7d1e-7a40-9a8e-000000000012",
            "heads_not_yet_met": 1,
            "kind": "added_before_saved_heads",
            "sequence": 3,
            "version": 4
          },
          {
            "aggregate": "0193f1c2-7d1e-7a40-9a8e-000000000012",
            "heads_not_yet_met": 1,
            "kind": "added_before_saved_heads",
            "sequence": 4,
            "version": 5
          }
        ]"#]]
    .assert_eq(&serde_json::to_string_pretty(&reports[0]["findings"]).unwrap());
}

/// A commit forged onto an incident's subject (the last one copied, its note edited, no hash
/// recomputed): the timeline still shows every stored event and names the broken link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_of_a_tampered_incident_shows_where_its_chain_breaks() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let incident = IncidentId(uuid::Uuid::from_u128(
        0x0193_f1c2_7d1e_7a40_9a8e_0000_0000_0003,
    ));
    write_incident(&url, incident, RESOLVE_NOTE).await;
    let subject = StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120))
        .subject(&AggregateId::new(incident.0.hyphenated().to_string()).unwrap());
    let jetstream = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = jetstream.get_stream("INCIDENTS").await.unwrap();
    let last = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    // Another Msg-Id, or the server drops the copy as a duplicate.
    let headers = copied_headers(&last.headers, "-forged");
    let needle = b"refilled";
    let mut payload = last.payload.to_vec();
    let at = payload
        .windows(needle.len())
        .position(|window| window == needle)
        .unwrap();
    payload[at] = b'R';
    jetstream
        .publish_with_headers(subject, headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();

    let timeline = audit(&url, &["timeline", &incident.0.to_string()]);
    assert!(timeline.status.success(), "{}", text(&timeline.stderr));
    let output = text(&timeline.stdout);
    // Events are numbered by version: the forged copy shows as a second version 5.
    let tail = &output[output.rfind("\n5  ").expect(&output) + 1..];
    expect![[r#"
        5  2026-11-23T13:20:00.000+08:00  department:chengguan/console-resolve
             Handler reported the case resolved
             by: department:chengguan/00000000-0000-0000-0000-00000000002a
             reason: Refilled the pothole and rolled it flat

        Hash chain: 1 BROKEN link(s); the events above are as stored, not as decided:
          at stream sequence 5 (version 5): version 5 follows version 5
        Run `wangge audit verify` for the whole log.
    "#]]
    .assert_eq(tail);

    let json = audit(&url, &["timeline", "--json", &incident.0.to_string()]);
    assert!(json.status.success(), "{}", text(&json.stderr));
    let document: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(document["chain_intact"], false);
    assert_eq!(document["events"].as_array().unwrap().len(), 6);
    expect![[r#"[{"detail":"version 5 follows version 5","sequence":5,"version":5}]"#]]
        .assert_eq(&document["chain_breaks"].to_string());

    // A stream that cannot be checked (INTAKE was never created here) does not hide the
    // forgery found in another: the findings are printed and the exit status is 3.
    let verify = audit(
        &url,
        &[
            "verify",
            "--stream",
            "incidents",
            "--stream",
            "intake",
            "--stream",
            "incidents",
        ],
    );
    assert_eq!(verify.status.code(), Some(3), "{}", text(&verify.stderr));
    let output = text(&verify.stdout);
    assert_eq!(output.matches("INCIDENTS:").count(), 1, "{output}");
    assert!(output.contains("FINDINGS"), "{output}");
    let errors = text(&verify.stderr);
    assert!(errors.contains("not checked: Intake"), "{errors}");
}

/// A stored message's headers for publishing a copy of it: without the `Nats-Expected-*`
/// checks of the original publish, its `Nats-Msg-Id` with `msg_id_suffix` appended.
fn copied_headers(stored: &async_nats::HeaderMap, msg_id_suffix: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in stored.iter() {
        let name_text = name.to_string();
        if name_text.starts_with("Nats-Expected") {
            continue;
        }
        for value in values {
            if name_text == "Nats-Msg-Id" {
                headers.append(name.clone(), format!("{value}{msg_id_suffix}"));
            } else {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    headers
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
