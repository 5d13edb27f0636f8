//! `cargo run --release -p projection --example bench_rebuild -- <events>`: the same figures as
//! `wangge bench rebuild`, without building the whole binary.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |arg| arg.parse())?;
    let chunks_in_flight = std::env::args()
        .nth(2)
        .map_or(Ok(projection::rebuild::REPLAY_CHUNKS_IN_FLIGHT), |arg| {
            arg.parse()
        })?;
    let rounds = std::env::args().nth(3).map_or(Ok(1), |arg| arg.parse())?;
    let write_during_replay = std::env::args().nth(4).is_none_or(|arg| arg != "at-end");
    let figures =
        projection::bench::run(events, rounds, chunks_in_flight, write_during_replay).await?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
