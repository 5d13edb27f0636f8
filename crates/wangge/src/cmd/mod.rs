//! One module per subcommand family; each owns its clap arguments and its `run`.
pub mod audit;
pub mod bench;
pub mod bench_dispatch;
pub mod bench_intake;
pub mod bench_pipeline;
pub mod bench_rebuild;
pub mod bench_store;
pub mod children;
pub mod demo;
pub mod demo_map;
pub mod instant;
pub mod partition;
pub mod projection;
pub mod serve;
pub mod standards;
