//! Several projection instances on one real nats-server: exactly one holds the builder lease
//! and folds, the others stand by and answer queries; the builder dies mid-stream (its task
//! aborted: no flush, no release) and a standby takes over within the lease's bound and
//! resumes from the KV checkpoint, so the read models equal a pure fold of the stream (nothing
//! counted twice, nothing lost); a builder that stops cleanly gives the lease back and the
//! next instance builds at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eventstore::EventStore;
use projection::synthetic::{self, Synthetic};
use projection::{LeaseTiming, LeaseValue, Progress, ReadModels};
use tokio::sync::watch;

mod common;

use common::{LEASE_TTL, WAIT_MAX, incidents_store, start, start_with_ttl};

async fn wait_until(progress: &mut watch::Receiver<Progress>, what: impl Fn(&Progress) -> bool) {
    tokio::time::timeout(WAIT_MAX, progress.wait_for(|p| what(p)))
        .await
        .expect("progress within the wait")
        .expect("service running");
}

async fn pure_fold(
    store: &EventStore<codecs::IncidentCodec>,
) -> BTreeMap<String, serde_json::Value> {
    projection::compare::fold_of_incidents(store, None)
        .await
        .unwrap()
}

async fn lease_holder(jetstream: &async_nats::jetstream::Context) -> Option<String> {
    let meta = jetstream
        .get_key_value(projection::keys::META_BUCKET)
        .await
        .unwrap();
    let value = meta.get(projection::keys::BUILDER_LEASE).await.unwrap()?;
    let lease: LeaseValue = serde_json::from_slice(&value).unwrap();
    Some(lease.instance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_builder_standbys_answer_a_standby_takes_over_without_double_counting() {
    let server = testkit::NatsServer::start().unwrap();
    let (client, jetstream, store) = incidents_store(&server.url()).await;
    let mut synthetic = Synthetic::new(31, Synthetic::default_grids(2, 2, 3));
    let histories: Vec<_> = (0..300).map(|n| synthetic.incident(n)).collect();
    let (first, second) = histories.split_at(150);

    // 1. Three instances: the first takes the lease, the others stand by.
    let a = start(&server.url(), "a").await;
    let b = start(&server.url(), "b").await;
    let c = start(&server.url(), "c").await;
    let roles = [&a, &b, &c].map(|running| running.progress.borrow().builder);
    assert_eq!(roles, [true, false, false]);
    assert_eq!(lease_holder(&jetstream).await.as_deref(), Some("a"));

    synthetic::append_histories(&store, first, 50)
        .await
        .unwrap();
    let half = store.last_sequence().await.unwrap();
    let mut a_progress = a.progress.clone();
    wait_until(&mut a_progress, |p| p.incidents_sequence >= half).await;
    // Standbys report the checkpoint their answers reflect, folding nothing themselves.
    let mut b_progress = b.progress.clone();
    wait_until(&mut b_progress, |p| p.incidents_sequence >= half).await;
    assert_eq!(
        (b_progress.borrow().applied, c.progress.borrow().applied),
        (0, 0)
    );
    // Every instance answers queries (queue group), the same totals whoever answers.
    for _ in 0..30 {
        let reply = client
            .request("projection.query.totals", "{}".into())
            .await
            .unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(reply["value"]["incidents"], 150, "{reply}");
    }
    let mut answered = queries_per_instance(&client).await;
    answered.sort_unstable();
    assert_eq!(answered.len(), 3, "{answered:?}");
    assert!(answered.iter().all(|count| *count > 0), "{answered:?}");

    // 2. The builder dies mid-stream while the second half is being appended.
    let appending = {
        let store = store.clone();
        let second = second.to_vec();
        tokio::spawn(async move { synthetic::append_histories(&store, &second, 10).await })
    };
    wait_until(&mut a_progress, |p| p.incidents_sequence > half).await;
    a.task.abort();
    let killed_at = Instant::now();
    let _ = a.task.await;
    // One standby takes over within TTL + one poll (+ its load of the incident states).
    let mut c_progress = c.progress.clone();
    let bound = LeaseTiming::from_ttl(LEASE_TTL).takeover_bound();
    let took_over = tokio::time::timeout(bound + Duration::from_secs(5), async {
        loop {
            if b_progress.borrow().builder || c_progress.borrow().builder {
                return;
            }
            tokio::select! {
                _ = b_progress.changed() => {}
                _ = c_progress.changed() => {}
            }
        }
    })
    .await;
    let failover = killed_at.elapsed();
    assert!(took_over.is_ok(), "no standby took over within {bound:?}");
    let b_builds = b_progress.borrow().builder;
    let (new_builder, standby) = if b_builds { (b, c) } else { (c, b) };
    assert!(!standby.progress.borrow().builder, "two builders at once");
    appending.await.unwrap().unwrap();
    let last = store.last_sequence().await.unwrap();
    let models = ReadModels::current(&jetstream).await.unwrap().unwrap();
    models.wait_for(last, 0, WAIT_MAX).await.unwrap();
    let expected = pure_fold(&store).await;
    assert_eq!(
        projection::compare::differing_keys(&models.dump().await.unwrap(), &expected),
        Vec::<String>::new(),
        "KV differs from the pure fold after the takeover"
    );
    assert_eq!(models.totals().await.unwrap().incidents, 300);
    eprintln!(
        "builder killed; a standby built again after {failover:?} (bound {bound:?} + load); \
         the new builder folded {} commits and skipped {}",
        new_builder.progress.borrow().applied,
        new_builder.progress.borrow().skipped
    );

    // 3. The new builder stops cleanly: it gives the lease back and the last standby builds
    //    at its next poll, well before a TTL.
    let mut last_progress = standby.progress.clone();
    new_builder.stop.send(true).unwrap();
    let stopped_at = Instant::now();
    new_builder.task.await.unwrap().unwrap();
    wait_until(&mut last_progress, |p| p.builder).await;
    let handover = stopped_at.elapsed();
    assert!(
        handover < LEASE_TTL,
        "a released lease was taken only after {handover:?}"
    );
    let mut extra = Synthetic::new(32, Synthetic::default_grids(2, 2, 3));
    let more: Vec<_> = (300..320).map(|n| extra.incident(n)).collect();
    synthetic::append_histories(&store, &more, 20)
        .await
        .unwrap();
    let last = store.last_sequence().await.unwrap();
    models.wait_for(last, 0, WAIT_MAX).await.unwrap();
    assert_eq!(
        projection::compare::differing_keys(
            &models.dump().await.unwrap(),
            &pure_fold(&store).await
        ),
        Vec::<String>::new()
    );
    assert_eq!(models.totals().await.unwrap().incidents, 320);
    eprintln!("clean stop: the lease changed hands after {handover:?}");
    standby.stop.send(true).unwrap();
    standby.task.await.unwrap().unwrap();
}

/// A builder whose flush the store refuses (its read-model bucket deleted under it: every
/// write fails with "no stream found", as while a cluster has no leader for it) stands by
/// rather than ending the service, gives the lease back, takes it again and builds afresh:
/// the service is still running and the read models come back equal to a pure fold. Before,
/// the failed flush ended the fold loop while the process stayed up answering queries: nobody
/// built again (this test then fails after 60 s, "never came back").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_whose_flush_fails_stands_by_and_builds_again() {
    let server = testkit::NatsServer::start().unwrap();
    let (_client, jetstream, store) = incidents_store(&server.url()).await;
    let mut synthetic = Synthetic::new(41, Synthetic::default_grids(2, 2, 3));
    let histories: Vec<_> = (0..120).map(|n| synthetic.incident(n)).collect();
    let (first, second) = histories.split_at(60);
    // A lease far longer than the flush's retries: the failed flush, not the lease's
    // expiry, ends this term.
    let builder = start_with_ttl(&server.url(), "only", Duration::from_secs(30)).await;
    let mut progress = builder.progress.clone();
    synthetic::append_histories(&store, first, 20)
        .await
        .unwrap();
    let half = store.last_sequence().await.unwrap();
    wait_until(&mut progress, |p| p.incidents_sequence >= half).await;
    let generation = ReadModels::current(&jetstream)
        .await
        .unwrap()
        .unwrap()
        .generation();
    jetstream
        .delete_key_value(projection::keys::generation_bucket(generation))
        .await
        .unwrap();
    synthetic::append_histories(&store, second, 20)
        .await
        .unwrap();
    let last = store.last_sequence().await.unwrap();
    // Standing by, taking the lease again (its next poll, 3 s) and refolding everything.
    let deadline = Instant::now() + WAIT_MAX * 2;
    let models = loop {
        assert!(
            !builder.task.is_finished(),
            "the service ended: {:?}",
            builder.task.await
        );
        let caught_up = match ReadModels::current(&jetstream).await {
            Ok(Some(models)) => match models.checkpoint().await {
                Ok(checkpoint) if checkpoint.incidents_sequence >= last => Some(models),
                _ => None,
            },
            _ => None,
        };
        if let Some(models) = caught_up {
            break models;
        }
        assert!(Instant::now() < deadline, "the read models never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        projection::compare::differing_keys(
            &models.dump().await.unwrap(),
            &pure_fold(&store).await
        ),
        Vec::<String>::new(),
        "KV differs from the pure fold after building again"
    );
    assert_eq!(models.totals().await.unwrap().incidents, 120);
    assert!(progress.borrow().builder);
    builder.stop.send(true).unwrap();
    builder.task.await.unwrap().unwrap();
}

/// `num_requests` of the query endpoint of every projection instance (`$SRV.STATS`).
async fn queries_per_instance(client: &async_nats::Client) -> Vec<u64> {
    use futures::StreamExt as _;
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.STATS.wangge-projection", inbox, bytes::Bytes::new())
        .await
        .unwrap();
    let mut counts = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), answers.next()).await
    {
        let stats: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        counts.push(stats["endpoints"][0]["num_requests"].as_u64().unwrap_or(0));
    }
    counts
}
