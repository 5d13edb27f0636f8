//! Measures `grids.locate` over NATS against the in-process `Locator`, on a synthetic city
//! registered through the registry's own commands. Figures go to docs/REGISTRY.md.
//!
//!     cargo run --release -p registry --example locate_over_nats -- [buildings] [seconds]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventstore::{BoundedContext, EventStore, StreamSpec};
use registry::{LocateAnswer, RegistryCodec, RegistryService, ServiceConfig};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Requests in flight for the throughput run.
const IN_FLIGHT: usize = 64;
/// Buildings per import command.
const IMPORT_BATCH: usize = 1_000;

async fn send(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    let reply = client
        .request(subject.to_owned(), body.to_string().into())
        .await
        .expect("request");
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let buildings: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let server = testkit::NatsServer::start().expect("nats-server");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let store = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        StreamSpec::for_context(BoundedContext::Grids, 1, Duration::from_secs(120)),
        RegistryCodec,
    )
    .await
    .expect("open GRIDS");
    let config = ServiceConfig::new(standards::builtin("loudi").expect("profile"));
    let service = RegistryService::start(client.clone(), store.clone(), config.clone())
        .await
        .expect("start");
    let locator = service.locator();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(service.run(stopped));

    let city = partition::synthetic::city(7, buildings, 400);
    let started = Instant::now();
    let (mut min_x, mut min_y, mut max_x, mut max_y) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    for community in &city {
        let boundary: Vec<Vec<Vec<[f64; 2]>>> = community
            .boundary
            .0
            .iter()
            .map(|polygon| {
                std::iter::once(polygon.exterior())
                    .chain(polygon.interiors())
                    .map(|ring| {
                        ring.0
                            .iter()
                            .map(|c| {
                                min_x = min_x.min(c.x);
                                min_y = min_y.min(c.y);
                                max_x = max_x.max(c.x);
                                max_y = max_y.max(c.y);
                                [c.x, c.y]
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let id = &community.id;
        let reply = send(
            &client,
            "grids.cmd.register_community",
            json!({"command_id": format!("{id}-r"), "community_id": id, "code": community.code,
                   "name": id, "street": "街道", "district": "娄星区", "boundary": boundary}),
        )
        .await;
        assert_eq!(reply["status"], "accepted", "{reply}");
        for (batch, chunk) in community.buildings.chunks(IMPORT_BATCH).enumerate() {
            let list: Vec<Value> = chunk
                .iter()
                .map(|b| {
                    json!({"id": b.id, "lon": b.position.x(), "lat": b.position.y(),
                                "households": b.households, "population": b.population})
                })
                .collect();
            let reply = send(
                &client,
                "grids.cmd.import_buildings",
                json!({"command_id": format!("{id}-i{batch}"), "community_id": id, "buildings": list}),
            )
            .await;
            assert_eq!(reply["status"], "accepted", "{reply}");
        }
        let reply = send(
            &client,
            "grids.cmd.partition",
            json!({"command_id": format!("{id}-p"), "community_id": id}),
        )
        .await;
        assert_eq!(reply["status"], "accepted", "{reply}");
    }
    println!(
        "registered {} communities, {buildings} buildings, {} grids through commands in {:.1} s",
        city.len(),
        locator.grids(),
        started.elapsed().as_secs_f64()
    );

    let point = move |i: u64| {
        let u = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        let v = (i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) >> 11) as f64 / (1u64 << 53) as f64;
        (min_x + u * (max_x - min_x), min_y + v * (max_y - min_y))
    };

    // In process.
    let started = Instant::now();
    let mut served = 0u64;
    let lookups = 1_000_000u64;
    for i in 0..lookups {
        let (x, y) = point(i);
        if matches!(locator.locate(x, y), LocateAnswer::Served { .. }) {
            served += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "in-process Locator: {:.0} lookups/s ({:.2} µs each), {:.0}% served",
        lookups as f64 / elapsed,
        elapsed * 1e6 / lookups as f64,
        served as f64 * 100.0 / lookups as f64
    );

    // Over NATS, one at a time.
    let mut latencies = Vec::new();
    for i in 0..2_000u64 {
        let (x, y) = point(i);
        let at = Instant::now();
        send(&client, "grids.locate", json!({"lon": x, "lat": y})).await;
        latencies.push(at.elapsed());
    }
    latencies.sort();
    println!(
        "grids.locate sequential: p50 {:?}, p99 {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );

    // Over NATS, IN_FLIGHT requests at once.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT as u64 {
        let client = client.clone();
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            let mut i = worker * 1_000_000;
            while Instant::now() < deadline {
                let (x, y) = point(i);
                i += 1;
                send(&client, "grids.locate", json!({"lon": x, "lat": y})).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    println!(
        "grids.locate with {IN_FLIGHT} in flight: {:.0} requests/s",
        done.load(Ordering::Relaxed) as f64 / seconds as f64
    );

    // Restart cost: a second instance rebuilds everything from the stream.
    let started = Instant::now();
    let mut second_config = config;
    second_config.instance = "second".to_owned();
    second_config.serve_requests = false;
    let second = RegistryService::start(client.clone(), store, second_config)
        .await
        .expect("second start");
    println!(
        "rebuild from the GRIDS stream: {:.2} s for {} grids",
        started.elapsed().as_secs_f64(),
        second.locator().grids()
    );
    drop(second);
    stop.send(true).expect("stop");
    task.await.expect("task").expect("clean stop");
}
