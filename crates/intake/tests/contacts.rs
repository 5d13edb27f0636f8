//! Contact writes against a real nats-server: an erasure made after a submission arrived is
//! never undone by that submission's contact write, however the two interleave.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use expect_test::{Expect, expect};
use intake::ServiceConfig;
use intake::contacts::{ContactWrite, StoredContact, write_contact};
use intake::wire::Contact;
use testkit::NatsServer;

const REPORTER: uuid::Uuid = uuid::Uuid::from_u128(0x0193a1b2_0000_7000_8000_000000000001);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

async fn bucket(url: &str) -> kv::Store {
    let client = async_nats::connect(url).await.expect("connect");
    intake::service::ensure_contacts_bucket(&jetstream::new(client), &ServiceConfig::default())
        .await
        .expect("contacts bucket")
}

/// What the bucket holds for the reporter, as text: the operation and the phone number.
async fn held(bucket: &kv::Store) -> String {
    match bucket.entry(REPORTER.to_string()).await.expect("read") {
        None => "never written".to_owned(),
        Some(entry) if entry.value.is_empty() => format!("{:?}", entry.operation),
        Some(entry) => {
            let stored: StoredContact = serde_json::from_slice(&entry.value).expect("details");
            format!("{:?} {}", entry.operation, stored.phone.unwrap_or_default())
        }
    }
}

fn contact(phone: &str) -> Contact {
    Contact {
        name: Some("张三".to_owned()),
        phone: Some(phone.to_owned()),
    }
}

/// Runs `steps` on a fresh bucket; each step is an erasure or a contact write whose
/// submission arrived `arrived_ms_ago` before the step (negative: after it), and records what
/// each did and what the bucket then held.
async fn check(steps: &[Step], expect: Expect) {
    let server = NatsServer::start().expect("nats-server");
    let bucket = bucket(&server.url()).await;
    let mut log = String::new();
    for step in steps {
        let did = match step {
            Step::Erase => {
                bucket.purge(REPORTER.to_string()).await.expect("purge");
                "erased".to_owned()
            }
            Step::Write {
                phone,
                arrived_ms_ago,
            } => {
                let done = write_contact(
                    &bucket,
                    REPORTER,
                    &contact(phone),
                    now_ms() - arrived_ms_ago,
                )
                .await
                .expect("write");
                format!("{done:?}")
            }
        };
        log.push_str(&format!(
            "{step:?} -> {did}; holds {}\n",
            held(&bucket).await
        ));
    }
    expect.assert_eq(&log);
}

#[derive(Debug)]
enum Step {
    Erase,
    Write {
        phone: &'static str,
        arrived_ms_ago: i64,
    },
}

#[tokio::test]
async fn a_write_keeps_an_erasure_made_after_its_submission_arrived() {
    check(
        &[
            Step::Write {
                phone: "13800000000",
                arrived_ms_ago: 0,
            },
            Step::Write {
                phone: "13900000000",
                arrived_ms_ago: 0,
            },
            // The office erases; a submission that arrived a minute earlier is written late
            // (a batch finishing, another instance): the details stay erased.
            Step::Erase,
            Step::Write {
                phone: "13800000000",
                arrived_ms_ago: 60_000,
            },
            // The reporter submits again after the erasure, giving the details anew.
            Step::Write {
                phone: "13700000000",
                arrived_ms_ago: -1_000,
            },
            // A submission that arrived before the erasure, written even later: the details
            // held are newer (and the erased number does not come back over them).
            Step::Write {
                phone: "13800000000",
                arrived_ms_ago: 60_000,
            },
            // One that arrived after those held replaces them.
            Step::Write {
                phone: "13600000000",
                arrived_ms_ago: -2_000,
            },
        ],
        expect![[r#"
            Write { phone: "13800000000", arrived_ms_ago: 0 } -> Written; holds Put 13800000000
            Write { phone: "13900000000", arrived_ms_ago: 0 } -> Written; holds Put 13900000000
            Erase -> erased; holds Purge
            Write { phone: "13800000000", arrived_ms_ago: 60000 } -> ErasedSince; holds Purge
            Write { phone: "13700000000", arrived_ms_ago: -1000 } -> Written; holds Put 13700000000
            Write { phone: "13800000000", arrived_ms_ago: 60000 } -> Superseded; holds Put 13700000000
            Write { phone: "13600000000", arrived_ms_ago: -2000 } -> Written; holds Put 13600000000
        "#]],
    )
    .await;
}

/// Many writes of submissions that all arrived before the erasure race the erasure: whatever
/// lands first, the details end erased (a plain put landing after the purge would have put
/// them back).
#[tokio::test]
async fn racing_writes_never_undo_an_erasure() {
    const WRITES: usize = 32;
    let server = NatsServer::start().expect("nats-server");
    let bucket = bucket(&server.url()).await;
    for round in 0..3 {
        let arrived_ms = now_ms() - 1_000;
        let writes = (0..WRITES).map(|index| {
            let bucket = bucket.clone();
            tokio::spawn(async move {
                // Spread over 8 ms, half of them after the purge below.
                tokio::time::sleep(Duration::from_micros(index as u64 * 250)).await;
                let phone = format!("1380000{round}{index:03}");
                write_contact(&bucket, REPORTER, &contact(&phone), arrived_ms).await
            })
        });
        let writes: Vec<_> = writes.collect();
        tokio::time::sleep(Duration::from_millis(4 + round)).await;
        bucket.purge(REPORTER.to_string()).await.expect("purge");
        for write in writes {
            match write.await.expect("task") {
                Ok(
                    ContactWrite::Written | ContactWrite::ErasedSince | ContactWrite::Superseded,
                ) => {}
                // Contention is a retryable failure (the submission is decided again).
                Err(intake::contacts::ContactWriteError::Contended { .. }) => {}
                Err(error) => panic!("round {round}: {error}"),
            }
        }
        let entry = bucket
            .entry(REPORTER.to_string())
            .await
            .expect("read")
            .expect("the purge marker");
        assert!(
            matches!(entry.operation, kv::Operation::Purge),
            "round {round}: erased details came back: {:?} {}",
            entry.operation,
            String::from_utf8_lossy(&entry.value)
        );
    }
}
