//! The resident apps against a real nats-server: submissions reach the bus as they are
//! made, not in bursts.

use std::time::Duration;

use async_nats::jetstream;
use simulation::{CityPlan, ResidentPlan, Residents};
use tokio::sync::watch;

/// Fewer than the publishes the apps keep in flight, so nothing forces an early drain.
const SUBMISSIONS: u64 = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_are_stored_while_the_apps_keep_reporting() {
    let server = testkit::NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    jetstream::new(client.clone())
        .create_stream(jetstream::stream::Config {
            name: "SUBMISSIONS".to_owned(),
            subjects: vec!["intake.submit.>".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();
    let city = simulation::plan_city(CityPlan {
        seed: 3,
        streets: 1,
        communities_per_street: 1,
        buildings_per_community: 20,
    });
    let policy = domain::Policy::embedded("sanming").unwrap();
    let residents = Residents::default();
    let (_stop, stopped) = watch::channel(false);
    let plan = ResidentPlan {
        submissions: SUBMISSIONS,
        rate_per_s: 60.0,
        ..ResidentPlan::default()
    };
    let running = {
        let (residents, client) = (residents.clone(), client.clone());
        tokio::spawn(async move { residents.run(&client, &city, &policy, plan, stopped).await })
    };
    // Sample while the apps are still submitting: some must already be stored.
    let mut stored_midway = None;
    while !running.is_finished() {
        let stats = residents.stats();
        if stats.submitted >= SUBMISSIONS / 2 && stats.submitted < SUBMISSIONS {
            stored_midway = Some(stats.clone());
            if stats.stored > 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.await.unwrap().unwrap();
    let midway = stored_midway.expect("sampled while reporting");
    assert!(
        midway.stored > 0,
        "nothing stored after {} submissions: {midway:?}",
        midway.submitted
    );
    let stats = residents.stats();
    assert_eq!((stats.submitted, stats.stored), (SUBMISSIONS, SUBMISSIONS));
    let stream = jetstream::new(client)
        .get_stream("SUBMISSIONS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(stream, SUBMISSIONS);
}
