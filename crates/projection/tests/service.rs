//! The projection builder on a real nats-server: the KV read models equal a pure fold of the
//! stream; a builder aborted mid-stream and restarted counts nothing twice; a rebuild swaps
//! generations and the running builder follows; an as-of replay stops at its point; queries
//! answer over request/reply.

use eventstore::EventStore;
use expect_test::expect;
use projection::synthetic::{self, Synthetic};
use projection::{NoProgress, ReadModels, RebuildOptions, Until};

mod common;

use common::{WAIT_MAX, specs};

/// The models a pure fold of the stream gives (to `until`, or to its end).
async fn pure_fold(
    store: &EventStore<codecs::IncidentCodec>,
    until: Option<u64>,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    projection::compare::fold_of_incidents(store, until)
        .await
        .unwrap()
}

async fn wait_checkpoint(models: &ReadModels, sequence: u64) {
    let checkpoint = models.wait_for(sequence, 0, WAIT_MAX).await.unwrap();
    assert!(
        checkpoint.incidents_sequence >= sequence,
        "checkpoint stuck at {checkpoint:?}, wanted {sequence}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_survives_abort_rebuild_swaps_as_of_stops_queries_answer() {
    let server = testkit::NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let (incidents_spec, grids_spec) = specs();
    let store = EventStore::open(
        jetstream.clone(),
        incidents_spec.clone(),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    let mut synthetic = Synthetic::new(21, Synthetic::default_grids(2, 2, 3));
    let histories: Vec<_> = (0..400).map(|n| synthetic.incident(n)).collect();
    let (first, second) = histories.split_at(200);

    // 1. A builder folds the first half; it is aborted (no shutdown, no final flush) while
    //    the second half is being appended, then a new one takes over the same generation.
    let running = common::start(&server.url(), "projection").await;
    synthetic::append_histories(&store, first, 50)
        .await
        .unwrap();
    let appending = {
        let store = store.clone();
        let second = second.to_vec();
        tokio::spawn(async move { synthetic::append_histories(&store, &second, 10).await })
    };
    let mut progress = running.progress.clone();
    let half = store.last_sequence().await.unwrap();
    while progress.borrow().incidents_sequence < half {
        tokio::time::timeout(WAIT_MAX, progress.changed())
            .await
            .expect("builder progresses")
            .unwrap();
    }
    running.task.abort();
    let _ = running.task.await;
    appending.await.unwrap().unwrap();
    let last = store.last_sequence().await.unwrap();
    let restarted = common::start(&server.url(), "projection").await;
    let models = ReadModels::current(&jetstream).await.unwrap().unwrap();
    assert_eq!(models.generation(), 1);
    wait_checkpoint(&models, last).await;
    let stored = models.dump().await.unwrap();
    let expected = pure_fold(&store, None).await;
    assert_eq!(
        projection::compare::differing_keys(&stored, &expected),
        Vec::<String>::new(),
        "KV differs from the pure fold"
    );
    let totals = models.totals().await.unwrap();
    assert_eq!(totals.incidents, 400);

    // 2. Queries over request/reply.
    let ask = |subject: &'static str, body: &'static str| {
        let client = client.clone();
        async move {
            let reply = client.request(subject, body.into()).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    let totals_reply = ask("projection.query.totals", "{}").await;
    assert_eq!(totals_reply["status"], "found");
    assert_eq!(totals_reply["value"]["incidents"], 400);
    // The queries are a NATS micro service endpoint, discoverable through `$SRV` (several
    // instances answer STATS here, so the first reply may be one that served no query).
    let stats = ask("$SRV.STATS.wangge-projection", "").await;
    assert_eq!(stats["name"], "wangge-projection");
    assert_eq!(stats["endpoints"][0]["name"], "query");
    assert_eq!(stats["endpoints"][0]["subject"], "projection.query.*");
    let incident_id = histories[0][0].incident.to_string();
    let incident_reply = client
        .request(
            "projection.query.incident",
            serde_json::to_vec(&serde_json::json!({ "incident_id": incident_id }))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    let incident_reply: serde_json::Value =
        serde_json::from_slice(&incident_reply.payload).unwrap();
    assert_eq!(
        incident_reply["value"],
        expected[&format!("incident.{incident_id}")]
    );
    let summary = |reply: serde_json::Value| -> String {
        let count = reply["value"].as_array().map(Vec::len);
        format!(
            "{} generation={} items={count:?} reason={}",
            reply["status"], reply["generation"], reply["reason_code"]
        )
    };
    let answers = [
        summary(ask("projection.query.scorecards", r#"{"kind":"street"}"#).await),
        summary(ask("projection.query.area", r#"{"level":"community"}"#).await),
        summary(
            ask(
                "projection.query.area",
                r#"{"level":"grid","code":"350402001001001"}"#,
            )
            .await,
        ),
        summary(ask("projection.query.board", r#"{"department":"nobody"}"#).await),
        {
            let quiet = ask("projection.query.board", r#"{"department":"quiet"}"#).await;
            let board = &quiet["value"];
            format!(
                "{} {} open={} entries={}",
                quiet["status"], board["department"], board["open"], board["entries"]
            )
        },
        summary(ask("projection.query.area", r#"{"level":"planet"}"#).await),
        summary(ask("projection.query.weather", "{}").await),
        summary(ask("projection.query.incident", "not json").await),
        summary(ask("projection.query.area", r#"{"level":"grid","limit":0}"#).await),
    ];
    expect![[r#"
        "found" generation=1 items=Some(2) reason=null
        "found" generation=1 items=Some(4) reason=null
        "found" generation=1 items=Some(1) reason=null
        "not_found" generation=1 items=None reason=null
        "found" "quiet" open=0 entries=[]
        "rejected" generation=null items=None reason="schema_violation"
        "rejected" generation=null items=None reason="unknown_model"
        "rejected" generation=null items=None reason="malformed_json"
        "rejected" generation=null items=None reason="schema_violation""#]]
    .assert_eq(&answers.join("\n"));

    // A list comes a page at a time: the pages, joined, are the whole list in code order.
    let whole = ask("projection.query.area", r#"{"level":"grid"}"#).await;
    assert!(whole.get("next_after").is_none(), "{whole}");
    let mut pages = Vec::new();
    let mut after = serde_json::Value::Null;
    loop {
        let body = serde_json::json!({"level": "grid", "limit": 5, "after": after});
        let reply = client
            .request("projection.query.area", body.to_string().into())
            .await
            .unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        pages.push(reply["value"].as_array().unwrap().clone());
        match reply.get("next_after") {
            Some(next) => after = next.clone(),
            None => break,
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    let joined: Vec<serde_json::Value> = pages.into_iter().flatten().collect();
    let codes = |items: &[serde_json::Value]| -> Vec<String> {
        items.iter().map(|item| item["code"].to_string()).collect()
    };
    let mut sorted = codes(whole["value"].as_array().unwrap());
    sorted.sort();
    assert_eq!(codes(&joined), sorted, "pages of sizes {sizes:?}");
    assert!(
        sizes.len() > 1 && sizes.iter().all(|size| *size <= 5),
        "{sizes:?}"
    );

    // 3. Rebuild into generation 2 and swap; the running builder follows and keeps folding.
    let options = RebuildOptions::new(incidents_spec.clone(), grids_spec.clone());
    let report = projection::rebuild(&jetstream, &options, &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        (report.generation, report.previous_generation),
        (2, Some(1))
    );
    assert_eq!(report.incidents_sequence, last);
    let mut more = Synthetic::new(22, Synthetic::default_grids(2, 2, 3));
    let extra: Vec<_> = (400..420).map(|n| more.incident(n)).collect();
    synthetic::append_histories(&store, &extra, 20)
        .await
        .unwrap();
    let last = store.last_sequence().await.unwrap();
    let models = ReadModels::current(&jetstream).await.unwrap().unwrap();
    assert_eq!(models.generation(), 2);
    wait_checkpoint(&models, last).await;
    let stored = models.dump().await.unwrap();
    let expected = pure_fold(&store, None).await;
    assert_eq!(
        projection::compare::differing_keys(&stored, &expected),
        Vec::<String>::new()
    );

    // 4. As of a sequence: exactly the commits up to it.
    let cut = last / 2;
    let report = projection::as_of(&jetstream, &options, Until::Sequence(cut), &NoProgress)
        .await
        .unwrap();
    assert_eq!(report.incidents_sequence, cut);
    let as_of = ReadModels::open_bucket(&jetstream, 0, &report.bucket)
        .await
        .unwrap();
    let stored = as_of.dump().await.unwrap();
    let expected = pure_fold(&store, Some(cut)).await;
    assert_eq!(
        projection::compare::differing_keys(&stored, &expected),
        Vec::<String>::new()
    );
    assert_eq!(
        ReadModels::current(&jetstream)
            .await
            .unwrap()
            .unwrap()
            .generation(),
        2,
        "an as-of replay swaps nothing"
    );

    // 5. As of a sequence past the end: refused before any bucket is made.
    let past = projection::as_of(
        &jetstream,
        &options,
        Until::Sequence(last + 1_000),
        &NoProgress,
    )
    .await;
    assert!(
        matches!(&past, Err(projection::RebuildError::PastEnd { last: at, .. }) if *at == last),
        "{past:?}"
    );
    let label = Until::Sequence(last + 1_000).label();
    assert!(
        jetstream
            .get_key_value(format!("PROJ_ASOF_{label}"))
            .await
            .is_err(),
        "no bucket for a refused replay"
    );

    // 6. As-of buckets are listed and dropped by label; a generation cannot be dropped here.
    assert_eq!(
        projection::as_of_buckets(&jetstream).await.unwrap(),
        vec![report.bucket.clone()]
    );
    let label = Until::Sequence(cut).label();
    assert!(projection::drop_as_of(&jetstream, &label).await.unwrap());
    assert!(
        !projection::drop_as_of(&jetstream, &report.bucket)
            .await
            .unwrap()
    );
    assert!(
        projection::as_of_buckets(&jetstream)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        projection::drop_as_of(&jetstream, "../PROJ_G2")
            .await
            .is_err()
    );
    assert!(ReadModels::current(&jetstream).await.unwrap().is_some());

    restarted.stop.send(true).unwrap();
    restarted.task.await.unwrap().unwrap();
}

/// A replay pointed at a server without the event streams fails and creates nothing (a
/// mistyped URL must not look like an empty city).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_never_creates_the_event_streams() {
    let server = testkit::NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let (incidents_spec, grids_spec) = specs();
    let options = RebuildOptions::new(incidents_spec.clone(), grids_spec.clone());
    let as_of = projection::as_of(&jetstream, &options, Until::Sequence(5), &NoProgress).await;
    let rebuilt = projection::rebuild(&jetstream, &options, &NoProgress).await;
    for outcome in [&as_of, &rebuilt] {
        match outcome {
            Err(error @ projection::RebuildError::NoStream { stream, .. }) => {
                assert_eq!(stream, &incidents_spec.stream_name);
                assert!(error.to_string().contains("never creates"), "{error}");
            }
            other => panic!("expected NoStream, got {other:?}"),
        }
    }
    for stream in [&incidents_spec.stream_name, &grids_spec.stream_name] {
        assert!(
            jetstream.get_stream(stream).await.is_err(),
            "{stream} was created"
        );
    }
}

/// Two rebuilds at once used to target the same generation, and the second emptied the
/// bucket the first was filling. Now the generation is claimed first: while one rebuild
/// holds the claim, a second is refused and makes no bucket; once it is given back, a
/// rebuild runs (and gives its own claim back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_is_refused_while_one_holds_the_claim() {
    let server = testkit::NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let (incidents_spec, grids_spec) = specs();
    let store = EventStore::open(
        jetstream.clone(),
        incidents_spec.clone(),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    EventStore::open(
        jetstream.clone(),
        grids_spec.clone(),
        registry::RegistryCodec,
    )
    .await
    .unwrap();
    let mut synthetic = Synthetic::new(5, Synthetic::default_grids(2, 2, 2));
    let histories: Vec<_> = (0..20).map(|n| synthetic.incident(n)).collect();
    synthetic::append_histories(&store, &histories, 10)
        .await
        .unwrap();
    let meta = projection::store::open_bucket(&jetstream, projection::keys::META_BUCKET, 1)
        .await
        .unwrap();

    let (first, abandoned) = projection::claim::Claim::take(&meta, 0).await.unwrap();
    assert_eq!((first.generation(), abandoned), (1, None));
    let second = projection::claim::Claim::take(&meta, 0).await;
    assert!(
        matches!(
            &second,
            Err(projection::StoreError::RebuildClaimed { generation: 1, .. })
        ),
        "{second:?}"
    );
    let options = RebuildOptions::new(incidents_spec, grids_spec);
    let refused = projection::rebuild(&jetstream, &options, &NoProgress).await;
    match &refused {
        Err(
            error @ projection::RebuildError::Store(projection::StoreError::RebuildClaimed {
                ..
            }),
        ) => {
            assert!(
                error.to_string().contains("is building generation 1"),
                "{error}"
            );
        }
        other => panic!("expected RebuildClaimed, got {other:?}"),
    }
    assert!(
        jetstream.get_key_value("PROJ_G1").await.is_err(),
        "a refused rebuild makes no bucket"
    );

    first.release().await.unwrap();
    let report = projection::rebuild(&jetstream, &options, &NoProgress)
        .await
        .unwrap();
    assert_eq!((report.generation, report.previous_generation), (1, None));
    assert_eq!(
        report.incidents_sequence,
        store.last_sequence().await.unwrap()
    );
    let (next, _) = projection::claim::Claim::take(&meta, 1).await.unwrap();
    assert_eq!(
        next.generation(),
        2,
        "the finished rebuild gave its claim back"
    );
    next.release().await.unwrap();

    // A dead rebuild's claim (not renewed for longer than the bound) is taken over: the next
    // rebuild builds the generation after it and deletes its half-written bucket.
    let dead = projection::claim::RebuildClaim {
        generation: 2,
        holder: "pid 1 on a host that crashed".to_owned(),
        claimed_at_ms: 0,
        renewed_at_ms: 0,
    };
    meta.put(
        projection::keys::REBUILD_CLAIM,
        serde_json::to_vec(&dead).unwrap().into(),
    )
    .await
    .unwrap();
    projection::store::open_bucket(&jetstream, "PROJ_G2", 1)
        .await
        .unwrap();
    let report = projection::rebuild(&jetstream, &options, &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        (report.generation, report.previous_generation),
        (3, Some(1))
    );
    assert!(
        jetstream.get_key_value("PROJ_G2").await.is_err(),
        "the abandoned bucket is deleted"
    );
}

/// An incident whose stored history does not hold together (its first commit deleted, as a
/// partial restore or a damaged block file leaves it) is folded as far as it goes and the
/// builder goes on: before, reading the history failed on the broken link and every builder
/// stopped at the same commit for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_with_a_missing_commit_does_not_stop_the_builder() {
    let server = testkit::NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let (mut incidents_spec, grids_spec) = specs();
    incidents_spec.immutable = false; // let the test delete a commit
    let store = EventStore::open(
        jetstream.clone(),
        incidents_spec.clone(),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    let mut synthetic = Synthetic::new(5, Synthetic::default_grids(2, 2, 3));
    let histories: Vec<_> = (0..6).map(|n| synthetic.incident(n)).collect();
    assert!(
        histories[0].len() >= 2,
        "the first incident has several commits"
    );
    // One commit at a time: sequence 1 is the first incident's first commit.
    synthetic::append_histories(&store, &histories, 1)
        .await
        .unwrap();
    jetstream
        .get_stream(&store.spec().stream_name)
        .await
        .unwrap()
        .delete_message(1)
        .await
        .unwrap();
    let last = store.last_sequence().await.unwrap();

    let running = common::start(&server.url(), "projection").await;
    let mut progress = running.progress.clone();
    tokio::time::timeout(
        WAIT_MAX,
        progress.wait_for(|p| p.incidents_sequence >= last),
    )
    .await
    .expect("the builder folds past the broken history")
    .unwrap();
    assert!(
        progress.borrow().history_skipped >= 1,
        "{:?}",
        *progress.borrow()
    );
    running.stop.send(true).unwrap();
    running.task.await.unwrap().unwrap();

    // A replay as of the end says which commits it could not fold, instead of leaving the
    // incident silently short of its history.
    let options = RebuildOptions::new(incidents_spec, grids_spec);
    let report = projection::as_of(&jetstream, &options, Until::Sequence(last), &NoProgress)
        .await
        .unwrap();
    let first_incident_commits = histories[0].len() as u64 - 1;
    assert_eq!(
        report.commits_not_following, first_incident_commits,
        "{report:?}"
    );
    assert_eq!(report.not_following.len() as u64, first_incident_commits);
    assert!(
        report
            .not_following
            .iter()
            .all(|(sequence, _)| *sequence > 1)
    );
}

/// A commit on INCIDENTS that this build cannot decode (here a foreign publish on the
/// stream's subjects; in a rolling upgrade, an event type from a newer build) is skipped,
/// counted and logged, and the builder folds every commit after it. Before, every builder
/// stood by on it and attached again every second, for good, while the read models went stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_does_not_decode_does_not_stop_the_builder() {
    let server = testkit::NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let (incidents_spec, _) = specs();
    let store = EventStore::open(jetstream.clone(), incidents_spec, codecs::IncidentCodec)
        .await
        .unwrap();
    let mut synthetic = Synthetic::new(5, Synthetic::default_grids(2, 2, 3));
    let histories: Vec<_> = (0..6).map(|n| synthetic.incident(n)).collect();
    synthetic::append_histories(&store, &histories[..3], 1)
        .await
        .unwrap();
    let junk_subject =
        store.subject(&eventstore::AggregateId::new(uuid::Uuid::nil().to_string()).unwrap());
    jetstream
        .publish(junk_subject, "not a commit".into())
        .await
        .unwrap()
        .await
        .unwrap();
    synthetic::append_histories(&store, &histories[3..], 1)
        .await
        .unwrap();
    let last = store.last_sequence().await.unwrap();

    let running = common::start(&server.url(), "projection").await;
    let mut progress = running.progress.clone();
    tokio::time::timeout(
        WAIT_MAX,
        progress.wait_for(|p| p.incidents_sequence >= last),
    )
    .await
    .expect("the builder folds past the undecodable commit")
    .unwrap();
    let commits: u64 = histories.iter().map(|history| history.len() as u64).sum();
    let folded = *progress.borrow();
    assert_eq!(
        (folded.undecodable_skipped, folded.applied, folded.builder),
        (1, commits, true),
        "{folded:?}"
    );
    running.stop.send(true).unwrap();
    running.task.await.unwrap().unwrap();
}
