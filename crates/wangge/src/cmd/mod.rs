//! One module per subcommand family; each owns its clap arguments and its `run`.
pub mod bench;
pub mod bench_dispatch;
pub mod bench_intake;
pub mod bench_store;
pub mod demo;
pub mod partition;
pub mod serve;
pub mod standards;
