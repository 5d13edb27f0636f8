//! Every request subject of every service refuses a request it cannot read with the same three
//! codes (`observe::refusal`): `malformed_json` when the body is not JSON, `schema_violation`
//! when it is JSON of the wrong shape (an array included), `payload_too_large` when it is over
//! the subject's limit.
//! A client handles "fix the request" once, whichever service it asked.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVICES: [&str; 4] = ["registry", "intake", "dispatch", "projection"];
/// How long the test waits for a service to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one refusal may take to come back.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger than the request limit of every subject but `grids.cmd.<command>` (an import batch
/// may take the server's whole payload limit, 1 MiB, so there the body is read and found of
/// the wrong shape).
const OVERSIZED_BYTES: usize = 100 * 1024;

/// Every request subject of the four services.
const SUBJECTS: [&str; 9] = [
    "grids.locate",
    "grids.query.community",
    "grids.cmd.register_community",
    "intake.request",
    "intake.query.receipt",
    "incidents.query.get",
    "intake.contact.erase",
    "dispatch.cmd.city.verify",
    "projection.query.incident",
];

/// The `wangge serve` children, killed when dropped.
struct Services(Vec<Child>);

impl Drop for Services {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn ask(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> Option<String> {
    let request = client.request(subject.to_owned(), body.into());
    match tokio::time::timeout(REPLY_TIMEOUT, request).await {
        Ok(Ok(reply)) => {
            let reply: serde_json::Value =
                serde_json::from_slice(&reply.payload).expect("replies are JSON");
            Some(reply["reason_code"].as_str().unwrap_or("(none)").to_owned())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_refuses_an_unreadable_request_with_the_shared_codes() {
    let server = testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let _services = Services(
        SERVICES
            .iter()
            .map(|service| {
                Command::new(env!("CARGO_BIN_EXE_wangge"))
                    .args(["serve", service])
                    .env_remove("WANGGE_CONFIG")
                    .env("WANGGE_NATS__URL", &url)
                    .env("WANGGE_LOG__FILTER", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("spawn a service")
            })
            .collect(),
    );
    let client = async_nats::connect(&url).await.expect("connect");
    let deadline = Instant::now() + READY_TIMEOUT;
    for subject in SUBJECTS {
        while ask(&client, subject, b"{".to_vec()).await.is_none() {
            assert!(Instant::now() < deadline, "{subject} never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut oversized = br#"{"padding":""#.to_vec();
    oversized.resize(OVERSIZED_BYTES, b'a');
    oversized.extend_from_slice(br#""}"#);
    let mut table = Vec::new();
    for subject in SUBJECTS {
        let mut row = vec![format!("{subject:<30}")];
        for body in [
            b"not json".to_vec(),
            br#""a string, not an object""#.to_vec(),
            oversized.clone(),
            // An array serde would read as a struct's fields in order (a locate's lon, lat):
            // JSON of the wrong shape all the same.
            br#"[117.6, 26.2]"#.to_vec(),
            // ... and a registry command's fields in order (register_community's).
            br#"["cmd-1", "c1", null, "350402001001", "n", "s", "d", [[[[117.6, 26.2], [117.61, 26.2], [117.61, 26.21], [117.6, 26.2]]]]]"#.to_vec(),
        ] {
            let code = ask(&client, subject, body).await;
            row.push(format!("{:<18}", code.as_deref().unwrap_or("(no answer)")));
        }
        table.push(row.concat().trim_end().to_owned());
    }
    expect_test::expect![[r#"
        grids.locate                  malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        grids.query.community         malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        grids.cmd.register_community  malformed_json    schema_violation  schema_violation  schema_violation  schema_violation
        intake.request                malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        intake.query.receipt          malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        incidents.query.get           malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        intake.contact.erase          malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        dispatch.cmd.city.verify      malformed_json    schema_violation  payload_too_large schema_violation  schema_violation
        projection.query.incident     malformed_json    schema_violation  payload_too_large schema_violation  schema_violation"#]]
    .assert_eq(&table.join("\n"));
}
