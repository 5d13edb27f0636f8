//! The dispatch service on a real nats-server, in virtual time: the whole whistle ladder with
//! silent departments, two instances at once (no double escalation), console commands with
//! typed rejections, and an offline console catching up on its notification subject.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use dispatch::notify::{Notification, Recipient, console_consumer};
use dispatch::{
    CommandReply, DispatchConfig, DispatchService, IncidentStore, ManualTime, TimeSource,
};
use domain::incident::{Action, IncidentCommand};
use domain::{Actor, ActorId, IncidentId, Policy, Role, Timestamp, decide};
use eventstore::{
    AggregateId, BoundedContext, Commit, CommitMeta, EventStore, Position, StreamSpec,
};
use expect_test::{Expect, expect};
use futures::StreamExt as _;
use tokio::sync::watch;

/// 2026-05-06 10:00 (UTC+8), a working day.
const START: Timestamp = Timestamp(1_778_032_800_000);
const MINUTE: i64 = 60_000;
const WAIT_MAX: Duration = Duration::from_secs(20);

fn actor(role: Role, n: u128) -> Actor {
    Actor {
        role,
        id: ActorId(uuid::Uuid::from_u128(n)),
    }
}

async fn open_store(url: &str) -> (async_nats::Client, IncidentStore) {
    open_store_with_window(url, Duration::from_secs(120)).await
}

/// [`open_store`] with the stream's duplicate window (when this call creates the stream).
async fn open_store_with_window(
    url: &str,
    duplicate_window: Duration,
) -> (async_nats::Client, IncidentStore) {
    let client = async_nats::connect(url).await.unwrap();
    let store = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        StreamSpec::for_context(BoundedContext::Incidents, 1, duplicate_window),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    (client, store)
}

/// Appends what intake wrote before it routed filings itself: Reported + Filed, as one
/// commit, at `now` (dispatch routes such a filing).
async fn report_and_file(
    store: &IncidentStore,
    n: u128,
    category: &str,
    now: Timestamp,
) -> IncidentId {
    file_commit(store, n, category, now, false).await
}

/// Appends Reported + Filed, and with `routed` the table's Dispatch as well (what intake
/// writes today), as one commit, at `now`.
async fn file_commit(
    store: &IncidentStore,
    n: u128,
    category: &str,
    now: Timestamp,
    routed: bool,
) -> IncidentId {
    let policy = Policy::embedded("sanming").unwrap();
    let incident = IncidentId(uuid::Uuid::from_u128(0x1000 + n));
    let reporter = actor(Role::Resident, 100 + n);
    let mut state = domain::IncidentState::default();
    let mut events = Vec::new();
    for command in [
        IncidentCommand {
            actor: reporter,
            action: Action::Report {
                incident,
                description: "fire in the stairwell".to_owned(),
                position: None,
                category_hint: None,
            },
        },
        IncidentCommand {
            actor: actor(Role::System, 9),
            action: Action::File {
                grid: "350402001002007".parse().unwrap(),
                category: category.parse().unwrap(),
            },
        },
    ]
    .into_iter()
    .chain(routed.then(|| IncidentCommand {
        actor: actor(Role::System, 9),
        action: Action::Dispatch { to: None },
    })) {
        for event in decide(&state, command, now, &policy).unwrap() {
            state.apply(&event);
            events.push(event);
        }
    }
    let meta = CommitMeta {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: "system:intake".to_owned(),
        occurred_at_ms: now.0,
        traceparent: None,
    };
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
    store
        .append(
            &aggregate,
            &Position::NEW,
            &Commit::new(format!("intake:{n}"), events, meta),
        )
        .await
        .unwrap();
    incident
}

struct Instance {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_instance(url: &str, name: &str, time: &ManualTime) -> Instance {
    start_instance_with(url, name, time, |_| {}).await
}

async fn start_instance_with(
    url: &str,
    name: &str,
    time: &ManualTime,
    configure: impl FnOnce(&mut DispatchConfig),
) -> Instance {
    let (client, store) = open_store(url).await;
    let mut config = DispatchConfig::new(Policy::embedded("sanming").unwrap());
    config.instance = name.to_owned();
    config.time = TimeSource::Manual(time.clone());
    config.deadline_poll_max = Duration::from_millis(20);
    config.snapshot_bucket = None;
    configure(&mut config);
    let service = DispatchService::start(client, store, config).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { service.run(stopped).await.unwrap() });
    Instance { stop, task }
}

/// One line per commit: who caused it (command id kind) and its event types, with the
/// deadline-missed kinds and the whistle levels.
async fn history(store: &IncidentStore, incident: IncidentId) -> String {
    use domain::incident::IncidentEvent as E;
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
    let loaded = store.load(&aggregate).await.unwrap();
    let mut out = String::new();
    for commit in &loaded.commits {
        if commit.meta.actor != "system:intake" {
            // Dispatch's commits carry ids derived from their command ids, never random ones.
            let derived = eventstore::command_uuid("dispatch", &commit.command_id);
            assert_eq!(
                (commit.meta.correlation_id, commit.meta.causation_id),
                (derived, derived),
                "commit {}",
                commit.command_id
            );
        }
        let cause = commit.command_id.split(':').next().unwrap_or("");
        let at = (commit.meta.occurred_at_ms - START.0) / MINUTE;
        let events: Vec<String> = commit
            .events
            .iter()
            .map(|e| match &e.event {
                E::Dispatched { handler, .. } => format!("Dispatched({handler})"),
                E::DeadlineMissed { deadline, .. } => format!("DeadlineMissed({deadline:?})"),
                E::WhistleBlown {
                    level, summoned, ..
                } => format!(
                    "WhistleBlown({level:?}: {})",
                    summoned
                        .iter()
                        .map(|s| s.department.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                E::WhistleEscalated {
                    from, to, summoned, ..
                } => format!(
                    "WhistleEscalated({from:?}->{to:?}: {})",
                    summoned
                        .iter()
                        .map(|s| s.department.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                E::WhistleReportMissed { department, .. } => {
                    format!("WhistleReportMissed({department})")
                }
                other => domain::encoding::encode_event(other).event_type.to_owned(),
            })
            .collect();
        out.push_str(&format!(
            "v{} +{at}min {cause}: {}\n",
            commit.version,
            events.join(" ")
        ));
    }
    out
}

async fn wait_version(store: &IncidentStore, incident: IncidentId, version: u64) {
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
    let started = std::time::Instant::now();
    loop {
        let position = store.last_position(&aggregate).await.unwrap();
        if position.version >= version {
            return;
        }
        assert!(
            started.elapsed() < WAIT_MAX,
            "incident stuck at version {}",
            position.version
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lets both instances look at the clock a few times (no event must appear).
/// The status updates received so far, one line each: version, status, events.
async fn statuses(subscriber: &mut async_nats::Subscriber) -> String {
    let mut lines = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), subscriber.next()).await
    {
        let status: codecs::status::IncidentStatus =
            serde_json::from_slice(&message.payload).expect("status JSON");
        assert_eq!(
            message.subject.as_str(),
            codecs::status::status_subject(IncidentId(status.incident_id))
        );
        lines.push(format!(
            "v{} {} {} handler={}",
            status.version,
            status.status,
            status.events.join(" "),
            status.handler.unwrap_or_default()
        ));
    }
    lines.join("\n")
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Sends `action` on the subject of the role the body's actor names (as a console bound to that
/// role would), with the role left in the body (it must then match the subject).
async fn request(
    client: &async_nats::Client,
    action: &str,
    body: serde_json::Value,
) -> CommandReply {
    let role = body["actor"]["role"].as_str().unwrap();
    let scope = match role.strip_prefix("department:") {
        Some(id) => format!("department.{id}"),
        None => role.to_owned(),
    };
    request_on(client, &format!("dispatch.cmd.{scope}.{action}"), body).await
}

/// Sends a console command; a body without a `command_id` gets a fresh one, as a console
/// gives every new command (the tests that resend one give it themselves).
async fn request_on(
    client: &async_nats::Client,
    subject: &str,
    mut body: serde_json::Value,
) -> CommandReply {
    if let Some(fields) = body.as_object_mut() {
        fields
            .entry("command_id")
            .or_insert_with(|| uuid::Uuid::now_v7().to_string().into());
    }
    let reply = client
        .request(
            subject.to_owned(),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn drain(consumer: &PullConsumer) -> Vec<Notification> {
    let mut out = Vec::new();
    let mut messages = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    while let Some(Ok(message)) = messages.next().await {
        out.push(serde_json::from_slice(&message.payload).unwrap());
        message.ack().await.unwrap();
    }
    out
}

fn check_commands(replies: &[(String, CommandReply)], expect: Expect) {
    let text: Vec<String> = replies
        .iter()
        .map(|(what, reply)| match reply {
            CommandReply::Accepted {
                version,
                events,
                duplicate,
                ..
            } => {
                format!(
                    "{what}: accepted v{version} dup={duplicate} {}",
                    events.join(" ")
                )
            }
            CommandReply::Rejected {
                reason_code,
                message,
            } => {
                format!("{what}: rejected {reason_code} ({message})")
            }
            CommandReply::Error {
                reason_code,
                message,
            } => format!("{what}: error {reason_code} ({message})"),
        })
        .collect();
    expect.assert_eq(&(text.join("\n") + "\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_departments_climb_the_whole_ladder_once_with_two_instances() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    let b = start_instance(&url, "dispatch-b", &time).await;
    let mut status_updates = client.subscribe("incidents.status.>").await.unwrap();
    client.flush().await.unwrap();

    // 0405 fire: emergency, handled by xiaofang (10 min to respond, 120 to resolve, wall
    // clock); the emergency whistle summons yingji (30 min to report).
    let fire = report_and_file(&store, 1, "0405", START).await;
    wait_version(&store, fire, 4).await;
    settle().await;

    // Consoles: a department the case is not assigned to, a resident, an unknown action.
    let chengguan =
        serde_json::json!({"role":"department:chengguan","id":uuid::Uuid::from_u128(7)});
    let yingji = serde_json::json!({"role":"department:yingji","id":uuid::Uuid::from_u128(8)});
    let replies = vec![
        ("chengguan acknowledges".to_owned(), request(&client, "acknowledge", serde_json::json!({"incident":fire.0,"actor":chengguan})).await),
        ("chengguan reports".to_owned(), request(&client, "report_to_whistle", serde_json::json!({"incident":fire.0,"actor":chengguan})).await),
        ("system role".to_owned(), request(&client, "acknowledge", serde_json::json!({"incident":fire.0,"actor":{"role":"system","id":uuid::Uuid::from_u128(1)}})).await),
        ("unknown action".to_owned(), request(&client, "park", serde_json::json!({"incident":fire.0,"actor":chengguan})).await),
        ("unknown incident".to_owned(), request(&client, "acknowledge", serde_json::json!({"incident":uuid::Uuid::from_u128(5),"actor":chengguan})).await),
        ("yingji verifies".to_owned(), request(&client, "verify", serde_json::json!({"incident":fire.0,"actor":yingji,"passed":true})).await),
        ("chengguan claims xiaofang".to_owned(), request_on(&client, "dispatch.cmd.department.chengguan.acknowledge", serde_json::json!({"incident":fire.0,"actor":{"role":"department:xiaofang","id":uuid::Uuid::from_u128(7)}})).await),
        ("old subject".to_owned(), request_on(&client, "dispatch.cmd.acknowledge.now", serde_json::json!({"incident":fire.0,"actor":chengguan})).await),
        ("no command id".to_owned(), {
            let body = serde_json::json!({"incident":fire.0,"actor":chengguan});
            let reply = client.request("dispatch.cmd.department.chengguan.acknowledge", serde_json::to_vec(&body).unwrap().into()).await.unwrap();
            serde_json::from_slice(&reply.payload).unwrap()
        }),
        ("empty command id".to_owned(), request(&client, "acknowledge", serde_json::json!({"command_id":"","incident":fire.0,"actor":chengguan})).await),
        ("no actor".to_owned(), request_on(&client, "dispatch.cmd.department.chengguan.acknowledge", serde_json::json!({"incident":fire.0})).await),
    ];
    check_commands(
        &replies,
        expect![[r#"
            chengguan acknowledges: rejected not_assigned (department:chengguan may not acknowledge: the case is neither assigned to it nor summoned it)
            chengguan reports: rejected not_summoned (department chengguan was not summoned by the active whistle)
            system role: rejected unknown_subject ("dispatch.cmd.system.acknowledge" is not dispatch.cmd.department.<id>.<action> or dispatch.cmd.<grid_worker|community|street|district|city|resident>.<action>)
            unknown action: rejected unknown_action (no console action "park"; one of ["acknowledge", "resolve", "return", "request_extension", "approve_extension", "blow_whistle", "report_to_whistle", "verify", "rate"])
            unknown incident: rejected no_such_incident (no incident has been reported under this id)
            yingji verifies: rejected invalid_transition (verify is not possible while the incident is Dispatched)
            chengguan claims xiaofang: rejected actor_mismatch (the body claims role "department:xiaofang" on a subject of role "department:chengguan")
            old subject: rejected unknown_subject ("dispatch.cmd.acknowledge.now" is not dispatch.cmd.department.<id>.<action> or dispatch.cmd.<grid_worker|community|street|district|city|resident>.<action>)
            no command id: rejected schema_violation (missing field `command_id` at line 1 column 135)
            empty command id: rejected schema_violation (command id must be 1..=128 bytes without control characters or white space at either end)
            no actor: rejected schema_violation (missing field `actor` at line 1 column 103)
        "#]],
    );

    // Nobody answers. Step past every deadline in turn.
    for (minutes, version) in [(11, 6), (31, 8), (41, 9), (121, 10)] {
        time.set(Timestamp(START.0 + minutes * MINUTE));
        wait_version(&store, fire, version).await;
        settle().await;
    }
    time.set(Timestamp(START.0 + 2_000 * MINUTE));
    settle().await;
    expect![[r#"
        v2 +0min intake: incident.reported incident.filed
        v4 +0min dispatch: Dispatched(department:xiaofang) WhistleBlown(Street: xiaofang,yingji)
        v6 +11min deadline: DeadlineMissed(Response) WhistleEscalated(Street->District: xiaofang)
        v8 +31min deadline: WhistleReportMissed(yingji) WhistleEscalated(District->City: yingji)
        v9 +41min deadline: WhistleReportMissed(xiaofang)
        v11 +121min deadline: WhistleReportMissed(yingji) DeadlineMissed(Resolution)
    "#]]
    .assert_eq(&history(&store, fire).await);
    // Each of dispatch's commits is announced once, by the instance that stored it (the test
    // wrote v2 itself, as intake would, so nobody announces that one).
    expect![[r#"
        v4 dispatched incident.dispatched incident.whistle_blown handler=department:xiaofang
        v6 dispatched incident.deadline_missed incident.whistle_escalated handler=department:xiaofang
        v8 dispatched incident.whistle_report_missed incident.whistle_escalated handler=department:xiaofang
        v9 dispatched incident.whistle_report_missed handler=department:xiaofang
        v11 dispatched incident.whistle_report_missed incident.deadline_missed handler=department:xiaofang"#]].assert_eq(&statuses(&mut status_updates).await);

    // yingji's console was never online: its durable consumer, made now, has it all.
    let jetstream = async_nats::jetstream::new(client.clone());
    let consumer = console_consumer(
        &jetstream,
        Recipient::Department("yingji".parse().unwrap()),
        "console-yingji",
    )
    .await
    .unwrap();
    let notes = drain(&consumer).await;
    let rendered: Vec<String> = notes
        .iter()
        .map(|n| format!("{} v{} {}", n.kind, n.version, n.recipient))
        .collect();
    expect![[r#"
        summoned v4 dispatch.notify.department.yingji
        report_missed v8 dispatch.notify.department.yingji
        summoned v8 dispatch.notify.department.yingji
        report_missed v11 dispatch.notify.department.yingji"#]]
    .assert_eq(&rendered.join("\n"));

    for instance in [a, b] {
        instance.stop.send(true).unwrap();
        instance.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_department_acknowledges_resolves_and_the_case_closes() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    let mut status_updates = client.subscribe("incidents.status.>").await.unwrap();
    client.flush().await.unwrap();
    let fire = report_and_file(&store, 2, "0405", START).await;
    wait_version(&store, fire, 4).await;
    let xiaofang = serde_json::json!({"role":"department:xiaofang","id":uuid::Uuid::from_u128(7)});
    let yingji = serde_json::json!({"role":"department:yingji","id":uuid::Uuid::from_u128(8)});
    let worker = serde_json::json!({"role":"grid_worker","id":uuid::Uuid::from_u128(9)});
    let resident = serde_json::json!({"role":"resident","id":uuid::Uuid::from_u128(100 + 2)});
    time.set(Timestamp(START.0 + 5 * MINUTE));
    let mut replies = Vec::new();
    for (what, action, body) in [
        (
            "yingji reports",
            "report_to_whistle",
            serde_json::json!({"incident":fire.0,"actor":yingji,"command_id":"c1"}),
        ),
        (
            "yingji reports again (same id)",
            "report_to_whistle",
            serde_json::json!({"incident":fire.0,"actor":yingji,"command_id":"c1"}),
        ),
        (
            "xiaofang reports with yingji's command id",
            "report_to_whistle",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"command_id":"c1"}),
        ),
        (
            "yingji reports again",
            "report_to_whistle",
            serde_json::json!({"incident":fire.0,"actor":yingji}),
        ),
        (
            "xiaofang resolves first",
            "resolve",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"note":"out"}),
        ),
        (
            "xiaofang acknowledges",
            "acknowledge",
            serde_json::json!({"incident":fire.0,"actor":xiaofang}),
        ),
        (
            "xiaofang asks for time",
            "request_extension",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"minutes":60,"reason":"smoke"}),
        ),
        (
            "street approves",
            "approve_extension",
            serde_json::json!({"incident":fire.0,"actor":{"role":"street","id":uuid::Uuid::from_u128(3)},"approve":true}),
        ),
        (
            "xiaofang resolves",
            "resolve",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"note":"out"}),
        ),
        (
            "grid worker verifies",
            "verify",
            serde_json::json!({"incident":fire.0,"actor":worker,"passed":true}),
        ),
        (
            "resident rates",
            "rate",
            serde_json::json!({"incident":fire.0,"actor":resident,"satisfaction":"satisfied"}),
        ),
    ] {
        replies.push((what.to_owned(), request(&client, action, body).await));
    }
    check_commands(
        &replies,
        expect![[r#"
            yingji reports: accepted v5 dup=false incident.whistle_reported
            yingji reports again (same id): accepted v5 dup=true 
            xiaofang reports with yingji's command id: rejected command_id_reused (command id c1 was already used for another command)
            yingji reports again: rejected already_reported_to_whistle (department yingji has already reported)
            xiaofang resolves first: rejected not_acknowledged (the handler has not acknowledged the case)
            xiaofang acknowledges: accepted v7 dup=false incident.acknowledged incident.whistle_reported
            xiaofang asks for time: accepted v8 dup=false incident.extension_requested
            street approves: accepted v9 dup=false incident.extension_approved
            xiaofang resolves: accepted v10 dup=false incident.resolved
            grid worker verifies: accepted v12 dup=false incident.verified incident.closed
            resident rates: accepted v13 dup=false incident.rated
        "#]],
    );
    // Nothing is due any more, however late it gets.
    time.set(Timestamp(START.0 + 10_000 * MINUTE));
    settle().await;
    wait_version(&store, fire, 13).await;
    let aggregate = AggregateId::new(fire.0.hyphenated().to_string()).unwrap();
    assert_eq!(store.last_position(&aggregate).await.unwrap().version, 13);
    // The console commands' commits carry ids derived from their command ids ("c1" is
    // yingji's report to the whistle), as the system's do.
    history(&store, fire).await;
    let loaded = store.load(&aggregate).await.unwrap();
    let console = loaded
        .commits
        .iter()
        .find(|commit| commit.command_id == "c1")
        .expect("the commit of command c1");
    assert_eq!(
        console.meta.correlation_id,
        eventstore::command_uuid("dispatch", "c1")
    );
    expect![[r#"
        v4 dispatched incident.dispatched incident.whistle_blown handler=department:xiaofang
        v5 dispatched incident.whistle_reported handler=department:xiaofang
        v7 acknowledged incident.acknowledged incident.whistle_reported handler=department:xiaofang
        v8 acknowledged incident.extension_requested handler=department:xiaofang
        v9 acknowledged incident.extension_approved handler=department:xiaofang
        v10 resolved incident.resolved handler=department:xiaofang
        v12 closed incident.verified incident.closed handler=department:xiaofang
        v13 closed incident.rated handler=department:xiaofang"#]]
    .assert_eq(&statuses(&mut status_updates).await);
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
}

/// Decides `action` by `by` on the incident's stored state and appends it under
/// `command_id`, as another dispatch instance would.
async fn append_elsewhere(
    store: &IncidentStore,
    incident: IncidentId,
    by: Actor,
    action: Action,
    now: Timestamp,
    command_id: &str,
) {
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
    let loaded = store.load(&aggregate).await.unwrap();
    let mut state = domain::IncidentState::default();
    for commit in &loaded.commits {
        for recorded in &commit.events {
            state.apply(&recorded.event);
        }
    }
    let events = decide(
        &state,
        IncidentCommand { actor: by, action },
        now,
        &Policy::embedded("sanming").unwrap(),
    )
    .unwrap();
    let meta = CommitMeta {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: format!("{}/{}", by.role, by.id),
        occurred_at_ms: now.0,
        traceparent: None,
    };
    store
        .append(
            &aggregate,
            &loaded.position,
            &Commit::new(command_id, events, meta),
        )
        .await
        .unwrap();
}

/// An instance whose follower lags the stream gets commands about changes it has not seen:
/// a case acknowledged elsewhere, an incident filed a moment ago. It reads the store before
/// refusing, so its answers are those of the latest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_behind_the_stream_reads_it_before_refusing() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let lagging = start_instance(&url, "dispatch-lagging", &time).await;
    let fire = report_and_file(&store, 3, "0405", START).await;
    wait_version(&store, fire, 4).await;
    settle().await;
    testkit::consumers::pause_follower(&client, "INCIDENTS", "dispatch-lagging").await;
    let xiaofang = actor(Role::Department("xiaofang".parse().unwrap()), 7);
    time.set(Timestamp(START.0 + 5 * MINUTE));
    append_elsewhere(
        &store,
        fire,
        xiaofang,
        Action::Acknowledge,
        time.now(),
        "acknowledged-elsewhere",
    )
    .await;
    let unseen = report_and_file(&store, 4, "0405", time.now()).await;
    let xiaofang_json =
        serde_json::json!({"role":"department:xiaofang","id":uuid::Uuid::from_u128(7)});
    let mut replies = Vec::new();
    for (what, action, body) in [
        (
            "xiaofang resolves (acknowledged elsewhere)",
            "resolve",
            serde_json::json!({"incident":fire.0,"actor":xiaofang_json,"note":"out"}),
        ),
        (
            "xiaofang acknowledges an incident filed a moment ago",
            "acknowledge",
            serde_json::json!({"incident":unseen.0,"actor":xiaofang_json}),
        ),
        // Neither id is in this instance's cache: only the stored history can tell a resend
        // from an id used again by someone else.
        (
            "xiaofang resends the acknowledge stored elsewhere",
            "acknowledge",
            serde_json::json!({"incident":fire.0,"actor":xiaofang_json,"command_id":"acknowledged-elsewhere"}),
        ),
        (
            "chengguan sends a command under that id",
            "acknowledge",
            serde_json::json!({"incident":fire.0,"actor":{"role":"department:chengguan","id":uuid::Uuid::from_u128(9)},"command_id":"acknowledged-elsewhere"}),
        ),
    ] {
        replies.push((what.to_owned(), request(&client, action, body).await));
    }
    check_commands(
        &replies,
        expect![[r#"
            xiaofang resolves (acknowledged elsewhere): accepted v7 dup=false incident.resolved
            xiaofang acknowledges an incident filed a moment ago: rejected not_assigned (department:xiaofang may not acknowledge: the case is neither assigned to it nor summoned it)
            xiaofang resends the acknowledge stored elsewhere: accepted v6 dup=true 
            chengguan sends a command under that id: rejected command_id_reused (command id acknowledged-elsewhere was already used for another command)
        "#]],
    );
    let _ = lagging.stop.send(true);
    lagging.task.await.unwrap();
}

/// Pauses (`until` = Some) or resumes the shared notifier consumer.
async fn pause_notifier(client: &async_nats::Client, until: Option<&str>) {
    let body = match until {
        Some(until) => serde_json::json!({ "pause_until": until }),
        None => serde_json::json!({}),
    };
    let reply = client
        .request(
            format!(
                "$JS.API.CONSUMER.PAUSE.INCIDENTS.{}",
                dispatch::service::NOTIFIER_DURABLE
            ),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.get("error").is_none(), "pause the notifier: {reply}");
}

/// The instance that stores a commit publishes its notifications itself, a dispatch before
/// the next turn and a console command before its answer: with the shared notifier consumer
/// paused, they are all there. Resumed, the notifier leaves those commits alone: each
/// notification goes out once, also on the core subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_answered_after_its_notifications_are_stored_and_they_go_out_once() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    pause_notifier(&client, Some("2099-01-01T00:00:00Z")).await;
    let mut published = client.subscribe("dispatch.notify.>").await.unwrap();
    client.flush().await.unwrap();
    let fire = report_and_file(&store, 3, "0405", START).await;
    wait_version(&store, fire, 4).await;
    let xiaofang = serde_json::json!({"role":"department:xiaofang","id":uuid::Uuid::from_u128(7)});
    let street = serde_json::json!({"role":"street","id":uuid::Uuid::from_u128(3)});
    let stream = async_nats::jetstream::new(client.clone())
        .get_stream(dispatch::notify::NOTIFICATIONS_STREAM)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for (what, action, body) in [
        (
            "xiaofang acknowledges",
            "acknowledge",
            serde_json::json!({"incident":fire.0,"actor":xiaofang}),
        ),
        (
            "xiaofang asks for time",
            "request_extension",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"minutes":60,"reason":"smoke"}),
        ),
        (
            "street approves",
            "approve_extension",
            serde_json::json!({"incident":fire.0,"actor":street,"approve":true}),
        ),
    ] {
        let reply = request(&client, action, body).await;
        let CommandReply::Accepted { sequence, .. } = reply else {
            panic!("{what}: {reply:?}");
        };
        // Read at once, without waiting: stored before the answer.
        let last = stream
            .get_last_raw_message_by_subject("dispatch.notify.department.xiaofang")
            .await
            .unwrap();
        let note: Notification = serde_json::from_slice(&last.payload).unwrap();
        seen.push(format!(
            "{what}: last for xiaofang {} v{} (this commit: {})",
            note.kind,
            note.version,
            note.stream_sequence == sequence
        ));
    }
    expect![[r#"
        xiaofang acknowledges: last for xiaofang summoned v4 (this commit: false)
        xiaofang asks for time: last for xiaofang summoned v4 (this commit: false)
        street approves: last for xiaofang extension_decided v8 (this commit: true)"#]]
    .assert_eq(&seen.join("\n"));
    // Resumed, the notifier reaches every commit: nothing is published twice.
    pause_notifier(&client, None).await;
    settle().await;
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    let mut kinds = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(200), published.next()).await
    {
        let note: Notification = serde_json::from_slice(&message.payload).unwrap();
        kinds.push(format!(
            "v{} {} {}",
            note.version, note.kind, message.subject
        ));
    }
    expect![[r#"
        v4 assigned dispatch.notify.department.xiaofang
        v4 whistle dispatch.notify.street.350402001
        v4 summoned dispatch.notify.department.xiaofang
        v4 summoned dispatch.notify.department.yingji
        v7 extension_requested dispatch.notify.street.350402001
        v8 extension_decided dispatch.notify.department.xiaofang"#]]
    .assert_eq(&kinds.join("\n"));
}

/// A notice for whoever handles the case goes to the handler of the time of its commit, even
/// when the notifier reaches that commit after the case changed hands: an extension approved
/// for xiaofang, and xiaofang handing the case on before the notifier got there, still tells
/// xiaofang (not the new handler) that its extension was decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_notifier_tells_the_handler_of_the_time() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    let fire = report_and_file(&store, 3, "0405", START).await;
    wait_version(&store, fire, 4).await;
    settle().await;
    // While no dispatch instance runs, consoles' commands are decided elsewhere; the shared
    // notifier consumer keeps them for whoever starts next.
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    let xiaofang = actor(Role::Department("xiaofang".parse().unwrap()), 7);
    let district = actor(Role::District, 3);
    let system = actor(Role::System, 1);
    // The request is made while the emergency whistle is at the street; the other summoned
    // departments then miss their reports and the whistle climbs to the district, which
    // decides the extension: the request's notice still goes to the street, as of its commit.
    for (by, action, command_id, after_minutes) in [
        (xiaofang, Action::Acknowledge, "acknowledged", 1),
        (
            xiaofang,
            Action::RequestExtension {
                minutes: 60,
                reason: "smoke".to_owned(),
            },
            "extension-requested",
            1,
        ),
        (system, Action::DeadlineElapsed, "reports-missed", 40),
        (
            district,
            Action::DecideExtension {
                approve: true,
                note: "granted".to_owned(),
            },
            "extension-approved",
            1,
        ),
        (
            xiaofang,
            Action::ReturnNotOurs {
                reason: domain::incident::ReturnReason::NotOurDuty,
                note: "a gas main, not a fire".to_owned(),
            },
            "returned",
            1,
        ),
    ] {
        time.set(Timestamp(time.now().0 + after_minutes * MINUTE));
        append_elsewhere(&store, fire, by, action, time.now(), command_id).await;
    }
    // The next instance reads the whole stream into its book before its notifier takes the
    // first of those commits: the book is past the approval when its notice is addressed.
    let mut published = client.subscribe("dispatch.notify.>").await.unwrap();
    client.flush().await.unwrap();
    let b = start_instance(&url, "dispatch-b", &time).await;
    let mut kinds = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(1), published.next()).await
    {
        let note: Notification = serde_json::from_slice(&message.payload).unwrap();
        kinds.push(format!(
            "v{} {} {}",
            note.version, note.kind, message.subject
        ));
    }
    b.stop.send(true).unwrap();
    b.task.await.unwrap();
    expect![[r#"
        v7 extension_requested dispatch.notify.street.350402001
        v9 report_missed dispatch.notify.department.yingji
        v9 whistle dispatch.notify.district.350402
        v9 summoned dispatch.notify.department.yingji
        v10 extension_decided dispatch.notify.department.xiaofang
        v11 assigned dispatch.notify.street.350402001"#]]
    .assert_eq(&kinds.join("\n"));
}

/// Intake routes a filing in its own commit: dispatch writes nothing for it, the handler is
/// told by the shared notifier (the commit names its grid, so the notice does not wait for
/// the book), and its deadlines are kept from the filing commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filing_routed_in_its_own_commit_is_not_dispatched_again() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let grid = "350402001002007".parse().unwrap();
    let worker = console_consumer(&jetstream, Recipient::Grid(grid), "grid-console")
        .await
        .unwrap();
    let water = file_commit(&store, 11, "0103", START, true).await;
    settle().await;
    let notes: Vec<String> = drain(&worker)
        .await
        .iter()
        .map(|note| format!("v{} {} due={:?}", note.version, note.kind, note.due))
        .collect();
    // The response deadline passes: dispatch escalates from the filing commit's deadlines.
    time.set(Timestamp(START.0 + 3 * 24 * 60 * MINUTE));
    wait_version(&store, water, 5).await;
    settle().await;
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    expect![[r#"
        v3 assigned due=Some(Timestamp(1778036400000))
        v3 +0min intake: incident.reported incident.filed Dispatched(grid_worker)
        v7 +4320min deadline: DeadlineMissed(Response) WhistleBlown(Community: chengguan) DeadlineMissed(Resolution) WhistleEscalated(Community->Street: chengguan)
    "#]]
    .assert_eq(&format!("{}\n{}", notes.join("\n"), history(&store, water).await));
}

/// An incident that ended leaves the book (here as soon as another ends: the book keeps one
/// ended incident) and is read back from the store when a command needs it: a rating that
/// reopens it is decided on its stored history and its handler is told, and the rating resent
/// past the store's duplicate window, after the incident left the book again, is answered as
/// the same command, not applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_that_left_the_book_is_read_back_for_a_command() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store_with_window(&url, Duration::from_secs(1)).await;
    let time = ManualTime::new(START);
    let a = start_instance_with(&url, "dispatch-a", &time, |config| {
        config.ended_held_max = 1;
    })
    .await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let department = console_consumer(
        &jetstream,
        Recipient::Department("xiaofang".parse().unwrap()),
        "xiaofang-console",
    )
    .await
    .unwrap();
    let fire = file_commit(&store, 21, "0405", START, true).await;
    let other = file_commit(&store, 22, "0405", START, true).await;
    settle().await;
    let xiaofang = serde_json::json!({"role":"department:xiaofang","id":uuid::Uuid::from_u128(7)});
    let worker = serde_json::json!({"role":"grid_worker","id":uuid::Uuid::from_u128(9)});
    let resident = serde_json::json!({"role":"resident","id":uuid::Uuid::from_u128(100 + 21)});
    let rating = serde_json::json!({"incident":fire.0,"actor":resident,"satisfaction":"unsatisfied","reopen":true,"command_id":"rate-1"});
    time.set(Timestamp(START.0 + 5 * MINUTE));
    let mut replies = Vec::new();
    let close = |incident: IncidentId| {
        [
            (
                "xiaofang acknowledges",
                "acknowledge",
                serde_json::json!({"incident":incident.0,"actor":xiaofang}),
            ),
            (
                "xiaofang resolves",
                "resolve",
                serde_json::json!({"incident":incident.0,"actor":xiaofang,"note":"out"}),
            ),
            (
                "grid worker verifies",
                "verify",
                serde_json::json!({"incident":incident.0,"actor":worker,"passed":true}),
            ),
        ]
    };
    // The fire closes, then the other case: the fire leaves the book.
    for (what, action, body) in close(fire).into_iter().chain(close(other)) {
        replies.push((what.to_owned(), request(&client, action, body).await));
    }
    settle().await;
    replies.push((
        "resident rates and reopens the fire".to_owned(),
        request(&client, "rate", rating.clone()).await,
    ));
    settle().await;
    // The reopened fire closes again, and the other case is rated: the fire leaves the book
    // again. Then the rating comes again, past the store's duplicate window.
    for (what, action, body) in close(fire) {
        replies.push((what.to_owned(), request(&client, action, body).await));
    }
    let rate_other = serde_json::json!({"incident":other.0,"actor":{"role":"resident","id":uuid::Uuid::from_u128(100 + 22)},"satisfaction":"satisfied"});
    replies.push((
        "the other case is rated".to_owned(),
        request(&client, "rate", rate_other).await,
    ));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // To an instance that did not answer it (so not from its cache of recent commands), and
    // that holds the other case, not the fire.
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    let b = start_instance_with(&url, "dispatch-b", &time, |config| {
        config.ended_held_max = 1;
    })
    .await;
    replies.push((
        "the rating resent to another instance".to_owned(),
        request(&client, "rate", rating).await,
    ));
    settle().await;
    b.stop.send(true).unwrap();
    b.task.await.unwrap();
    check_commands(
        &replies,
        expect![[r#"
            xiaofang acknowledges: accepted v6 dup=false incident.acknowledged incident.whistle_reported
            xiaofang resolves: accepted v7 dup=false incident.resolved
            grid worker verifies: accepted v9 dup=false incident.verified incident.closed
            xiaofang acknowledges: accepted v6 dup=false incident.acknowledged incident.whistle_reported
            xiaofang resolves: accepted v7 dup=false incident.resolved
            grid worker verifies: accepted v9 dup=false incident.verified incident.closed
            resident rates and reopens the fire: accepted v11 dup=false incident.rated incident.reopened
            xiaofang acknowledges: accepted v12 dup=false incident.acknowledged
            xiaofang resolves: accepted v13 dup=false incident.resolved
            grid worker verifies: accepted v15 dup=false incident.verified incident.closed
            the other case is rated: accepted v10 dup=false incident.rated
            the rating resent to another instance: accepted v11 dup=true 
        "#]],
    );
    let kinds: Vec<String> = drain(&department)
        .await
        .iter()
        .map(|note| format!("v{} {}", note.version, note.kind))
        .collect();
    expect![[r#"
        v4 assigned
        v4 summoned
        v4 assigned
        v4 summoned
        v11 assigned"#]]
    .assert_eq(&kinds.join("\n"));
}

/// A filed incident whose dispatch the store refused is dispatched once the store takes
/// writes again, without a restart and without a later commit of the incident (a filed
/// incident has no deadline, so nothing else would move it). The refusal here is a stream
/// limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_the_store_refused_is_tried_again() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let stream_name = store.spec().stream_name.clone();
    let incident = report_and_file(&store, 3, "0101", START).await;
    let filed = 2;
    wait_version(&store, incident, filed).await;
    // Every incident subject full: one commit each, new ones refused.
    let mut config = jetstream
        .get_stream(&stream_name)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    let open_config = config.clone();
    config.max_messages_per_subject = 1;
    config.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    config.discard_new_per_subject = true;
    jetstream.update_stream(config).await.unwrap();

    let time = ManualTime::new(START);
    let instance = start_instance(&url, "dispatch-a", &time).await;
    // Longer than one append's own retries (8 attempts, 0.5 s apart): the dispatch was given
    // up at least once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
    assert_eq!(
        store.last_position(&aggregate).await.unwrap().version,
        filed,
        "the store refused the dispatch"
    );

    jetstream.update_stream(open_config).await.unwrap();
    wait_version(&store, incident, filed + 1).await;
    let text = history(&store, incident).await;
    assert!(text.contains("Dispatched("), "{text}");
    instance.stop.send(true).unwrap();
    instance.task.await.unwrap();
}

/// A console resends a command whose first answer it never got, after the store's duplicate
/// window, to an instance that did not answer it, while the case has moved back to a state
/// that accepts the command again (a failed verification reopens the work). The command is
/// answered as the duplicate it is, not stored a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_resent_after_the_duplicate_window_is_not_applied_twice() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    // The stream made here first, with a one-second duplicate window (the default is 120 s).
    let (client, store) = open_store_with_window(&url, Duration::from_secs(1)).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    let fire = report_and_file(&store, 4, "0405", START).await;
    wait_version(&store, fire, 4).await;
    let xiaofang = serde_json::json!({"role":"department:xiaofang","id":uuid::Uuid::from_u128(7)});
    let worker = serde_json::json!({"role":"grid_worker","id":uuid::Uuid::from_u128(9)});
    let mut replies = Vec::new();
    for (what, action, body) in [
        (
            "xiaofang acknowledges",
            "acknowledge",
            serde_json::json!({"incident":fire.0,"actor":xiaofang}),
        ),
        (
            "xiaofang resolves (r1)",
            "resolve",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"command_id":"r1"}),
        ),
        (
            "the grid worker finds it not done",
            "verify",
            serde_json::json!({"incident":fire.0,"actor":worker,"passed":false,"note":"still smoking"}),
        ),
    ] {
        replies.push((what.to_owned(), request(&client, action, body).await));
    }
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    // Past the duplicate window, another instance (nothing in its reply cache) gets r1 again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let b = start_instance(&url, "dispatch-b", &time).await;
    replies.push((
        "xiaofang's console resends r1".to_owned(),
        request(
            &client,
            "resolve",
            serde_json::json!({"incident":fire.0,"actor":xiaofang,"command_id":"r1"}),
        )
        .await,
    ));
    check_commands(
        &replies,
        expect![[r#"
            xiaofang acknowledges: accepted v6 dup=false incident.acknowledged incident.whistle_reported
            xiaofang resolves (r1): accepted v7 dup=false incident.resolved
            the grid worker finds it not done: accepted v8 dup=false incident.verification_failed
            xiaofang's console resends r1: accepted v7 dup=true 
        "#]],
    );
    let aggregate = AggregateId::new(fire.0.hyphenated().to_string()).unwrap();
    assert_eq!(store.last_position(&aggregate).await.unwrap().version, 8);
    b.stop.send(true).unwrap();
    b.task.await.unwrap();
}

/// A message on `incidents.ev.*` that is not a commit (another client's publish: no envelope)
/// is skipped by the follower and the notifier: dispatch goes on routing and notifying.
/// Before, the follower stopped dispatch on it, and a restart stopped on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_a_commit_does_not_stop_dispatch() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);
    let a = start_instance(&url, "dispatch-a", &time).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let grid = "350402001002007".parse().unwrap();
    let worker = console_consumer(&jetstream, Recipient::Grid(grid), "grid-console")
        .await
        .unwrap();
    let stray = AggregateId::new(uuid::Uuid::from_u128(0xbad).hyphenated().to_string()).unwrap();
    jetstream
        .publish(store.subject(&stray), "not a commit".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let water = file_commit(&store, 12, "0103", START, true).await;
    settle().await;
    let notes: Vec<String> = drain(&worker)
        .await
        .iter()
        .map(|note| format!("v{} {}", note.version, note.kind))
        .collect();
    assert_eq!(notes, ["v3 assigned"], "{water}");
    // Stray messages between commits, published faster than the notifier takes them, reach
    // it inside its batches: each is acked where it stands in its batch, none waits for the
    // ack wait to come back (before, only one that opened a batch was acked).
    let mut acks = Vec::new();
    for n in 13..53 {
        acks.push(
            jetstream
                .publish(store.subject(&stray), "not a commit".into())
                .await
                .unwrap(),
        );
        file_commit(&store, n, "0103", START, true).await;
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let mut told = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while told < 40 && tokio::time::Instant::now() < deadline {
        told += drain(&worker).await.len();
    }
    assert_eq!(told, 40, "every filing is told");
    settle().await;
    let mut notifier = jetstream
        .get_stream("INCIDENTS")
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            dispatch::service::NOTIFIER_DURABLE,
        )
        .await
        .unwrap();
    let info = notifier.info().await.unwrap();
    assert_eq!(
        (info.num_ack_pending, info.num_pending),
        (0, 0),
        "every message acked"
    );
    assert!(!a.task.is_finished(), "dispatch is still serving");
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
}
