//! `wangge`: the one binary a city engineer runs. Every service, the offline tools, the
//! benchmarks and the demo are subcommands of it, so one build, one config file and one
//! `--help` cover the whole system.
#![forbid(unsafe_code)]

mod cmd;
mod config;
mod logging;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: with many small, short-lived buffers on several threads
/// (messages, headers, envelopes), glibc's allocator was about a quarter of the services' CPU
/// (perf, docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// wangge (网格): event-sourced backend for urban grid management on NATS JetStream.
///
/// Configuration comes from a TOML file (`--config`, or `$WANGGE_CONFIG`) and is overridden by
/// `WANGGE_*` environment variables, e.g. `WANGGE_NATS__URL=nats://10.0.0.5:4222`; a
/// service's flags override both.
/// `wangge config` prints the effective configuration.
#[derive(Debug, Parser)]
#[command(name = "wangge", version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(long, global = true, env = "WANGGE_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// Log format: `pretty` for people, `json` for log collectors.
    #[arg(long, global = true, env = "WANGGE_LOG_FORMAT")]
    log_format: Option<logging::LogFormat>,

    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  wangge demo --out /tmp/wangge-demo           # a whole simulated city, about 2 minutes
  wangge config                                # the settings this run would use
  wangge up && wangge serve registry           # create the streams, run one service
  wangge partition --input city.geojson --out grids.geojson
  wangge audit timeline <incident-id>          # one incident's story, in plain words
  wangge bench pipeline --json                 # intake -> dispatch -> projection vs raw NATS
Every command has its own --help with more.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the effective configuration (file + environment) as TOML.
    Config,
    /// Create or update every stream, consumer and bucket wangge needs, then exit.
    Up(cmd::serve::UpArgs),
    /// Run one service until SIGINT/SIGTERM.
    Serve(cmd::serve::ServeArgs),
    /// Start a private nats-server and every service, simulate a city, print a report.
    Demo(cmd::demo::DemoArgs),
    /// Benchmarks that print ratios against raw NATS measured in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Partition communities into ~200-household grids (offline, no NATS).
    Partition(cmd::partition::PartitionArgs),
    /// Import foreign data (OpenStreetMap) into wangge's GeoJSON input.
    #[command(subcommand)]
    Import(cmd::partition::ImportCommand),
    /// Check communities against a city's policy standards (offline, no NATS).
    Standards(cmd::standards::StandardsArgs),
    /// Read models: rebuild from the log, replay as of a time or sequence.
    #[command(subcommand)]
    Projection(cmd::projection::ProjectionCommand),
    /// Audit the event log: incident timelines, hash-chain verification, JSON-lines export.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
}

/// The variables clap reads for the global flags, with what each must hold. Set but empty,
/// clap refuses them with an error that names the flag (`--config`), not the variable the
/// operator set; [`parse_command_line`] names the variable instead.
const FLAG_VARIABLES: [(&str, &str); 2] = [
    ("WANGGE_CONFIG", "the path of a TOML configuration file"),
    ("WANGGE_LOG_FORMAT", "`pretty` or `json`"),
];

/// The first flag variable that is set but empty, as an error message.
fn empty_flag_variable() -> Option<String> {
    FLAG_VARIABLES.iter().find_map(|(name, wanted)| {
        let value = std::env::var_os(name)?;
        value
            .is_empty()
            .then(|| format!("{name} is set but empty: unset it, or set it to {wanted}"))
    })
}

/// The command line, or exit 2 with clap's error (or, when a flag's variable is set but
/// empty, an error naming the variable).
fn parse_command_line() -> Result<Cli, std::process::ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(error) => {
            use clap::error::ErrorKind;
            let asked_for_text = matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            match empty_flag_variable() {
                Some(message) if !asked_for_text => {
                    eprintln!("error: {message}");
                    Err(std::process::ExitCode::from(2))
                }
                _ => error.exit(),
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let settings = match config::Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {}", logging::error_chain(&error));
            return std::process::ExitCode::from(2);
        }
    };
    let log_format = cli.log_format.unwrap_or(settings.log.format);
    if let Err(error) = logging::init(log_format, &settings.log.filter) {
        eprintln!("error: {}", logging::error_chain(&error));
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Config => {
            // Show what this run uses: `--log-format` (or WANGGE_LOG_FORMAT) wins over the
            // file, and `RUST_LOG` over `log.filter`.
            let mut shown = settings.clone();
            shown.log.format = log_format;
            shown.log.filter = logging::effective_filter(&settings.log.filter).0;
            config::print(&shown)
        }
        Command::Up(args) => cmd::serve::up(&settings, args),
        Command::Serve(args) => cmd::serve::serve(&settings, args),
        Command::Demo(args) => cmd::demo::run(&settings, args),
        Command::Bench(command) => cmd::bench::run(&settings, command),
        Command::Partition(args) => cmd::partition::run(args),
        Command::Import(command) => cmd::partition::import(command),
        Command::Standards(args) => cmd::standards::run(args),
        Command::Projection(command) => cmd::projection::run(&settings, command),
        Command::Audit(command) => cmd::audit::run(&settings, command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let message = logging::error_chain(&error);
            // Once: a structured line for collectors, a plain one for a person.
            match log_format {
                // Through the subscriber when its filter lets the line through; else written
                // directly, in the same shape, so that no filter can hide why the process
                // failed (`RUST_LOG=intake=debug` leaves this crate's errors off).
                logging::LogFormat::Json if tracing::enabled!(tracing::Level::ERROR) => {
                    tracing::error!(error = message, "wangge failed")
                }
                logging::LogFormat::Json => eprintln!("{}", logging::fatal_json_line(&message)),
                logging::LogFormat::Pretty => eprintln!("error: {message}"),
            }
            if error.downcast_ref::<cmd::audit::NotIntact>().is_some() {
                std::process::ExitCode::from(cmd::audit::EXIT_NOT_INTACT)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
