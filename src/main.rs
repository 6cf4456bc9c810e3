//! `fleetgate`: one binary for the whole platform.
//!
//! `fleetgate up` runs everything in one process; the other commands are
//! clients of a running server's HTTP API.

mod bench;
mod client;
mod etl_cli;
mod import_cli;
mod node;
mod report_cli;
mod state;
mod status;
mod tls;
mod udp_ingest;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The ingest profile spends about a sixth of its time in glibc malloc/free
// (BENCHMARKS.md); mimalloc serves many small, short-lived allocations faster.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fleetgate", version, about = "Edge-to-cloud IoT data platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where admin commands find the server and their token.
#[derive(clap::Args, Clone)]
pub struct ServerArgs {
    /// Base URL of the running server's HTTP API.
    #[arg(
        long,
        env = "FLEETGATE_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// Data directory holding admin.token (when FLEETGATE_TOKEN is not set).
    #[arg(long, default_value = "fleetgate-data", global = true)]
    data: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gatekeeper broker, store, admin service and HTTP API in one process.
    Up(up::UpArgs),
    /// Cluster mode: the gatekeeper and HTTP API, spreading ingest over
    /// `fleetgate store` nodes that share its PostgreSQL database.
    Broker(up::BrokerArgs),
    /// Cluster mode: a store node (validation, group commit) for `fleetgate broker`.
    Store(node::StoreArgs),
    /// Register devices, mint tokens, revoke, change roles, lift bans.
    Device {
        #[command(subcommand)]
        command: client::DeviceCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Declare streams.
    Stream {
        #[command(subcommand)]
        command: client::StreamCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Declared views: aggregates kept up to date, which queries use by themselves.
    View {
        #[command(subcommand)]
        command: client::ViewCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Batch ETL jobs: declare, run (with progress), list runs and rejects.
    Etl {
        #[command(subcommand)]
        command: etl_cli::EtlCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Hybrid batch/real-time reports and their reconciliations.
    Report {
        #[command(subcommand)]
        command: report_cli::ReportCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Anomaly analyses over streams, and the alerts they raise.
    Analysis {
        #[command(subcommand)]
        command: report_cli::AnalysisCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Cluster state (validation rules, lookup tables): roll out at one instant.
    State {
        #[command(subcommand)]
        command: client::StateCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Device SDKs: build one offline, fetch one as a device, inspect a bundle.
    Sdk {
        #[command(subcommand)]
        command: client::SdkCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Measure durable ingest over MQTT against a fresh server, and a reference broker.
    Bench(bench::BenchArgs),
    /// One screen for an operator: devices connected, ingest and rejects
    /// per second, views, store nodes, the newest alerts and ETL runs.
    Status {
        /// How long to watch the counters for the per-second rates.
        #[arg(long, default_value = "1s", value_parser = fleetgate_protocol::duration::parse)]
        interval: std::time::Duration,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run a read-only SQL query and print the result as a table.
    Query {
        /// One read-only SELECT over streams, batch tables and analysis tables.
        sql: String,
        /// Show which view (or the primary table) would answer, and why,
        /// without running it.
        #[arg(long)]
        explain: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn main() -> ExitCode {
    // Before SQLite is first used, which is the only time it may be done:
    // SQLite's allocations on a query's thread count against the query's
    // memory budget.
    if let Err(e) = fleetgate_store::sqlite_limits::install_budgets() {
        eprintln!("fleetgate: queries on SQLite run without memory budgets: {e}");
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Queries' trees are walked recursively on the workers (view
        // routing, expansion): the query guard bounds their depth for
        // this stack, not tokio's default 2 MiB. Address space only: a
        // thread touches what it uses.
        .thread_stack_size(fleetgate_store::query::WORKER_STACK_BYTES)
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Broker(args) => up::run_broker(args).await,
            Command::Store(args) => node::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Device { command, server } => client::device(command, &server).await,
            Command::Stream { command, server } => client::stream(command, &server).await,
            Command::Sdk { command, server } => client::sdk(command, &server).await,
            Command::State { command, server } => client::state(command, &server).await,
            Command::View { command, server } => client::view(command, &server).await,
            Command::Etl { command, server } => etl_cli::etl(command, &server).await,
            Command::Report { command, server } => report_cli::report(command, &server).await,
            Command::Analysis { command, server } => report_cli::analysis(command, &server).await,
            Command::Status { interval, server } => status::run(&server, interval).await,
            Command::Query {
                sql,
                explain,
                server,
            } => client::query(&sql, explain, &server).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand, argument and option says what it is in `--help`
    /// (a newcomer's first documentation), hidden test switches aside.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "fleetgate", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
