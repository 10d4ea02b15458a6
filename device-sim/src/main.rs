//! device-sim: simulated IoT devices for the gateway, written against the protocol text alone
//! (it shares no code with the gateway): a demo fleet, a load generator, a connection holder,
//! and the same load for an MQTT broker (the benchmark's transport ceiling).

mod api;
mod background;
mod backoff;
mod bench;
mod bench_commands;
mod bench_report;
mod chaos;
mod cli;
mod commands;
mod conn;
#[cfg(unix)]
mod demo;
mod device;
mod fleet;
mod idle;
mod mqtt;
mod outbox;
mod proto;
mod run;
mod sensor;
mod shards;
mod shutdown;
mod stats;
mod tls;
mod tokens;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod mock_gateway;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Exit status of a run that completed but saw errors (failed connections, `error` answers, ...).
const EXIT_WITH_ERRORS: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let clean = match &cli.command {
        Command::Run(args) => run::run(&cli.common, args).await,
        Command::Bench(args) => bench::bench(&cli.common, args).await,
        Command::BenchCommands(args) => bench_commands::bench_commands(&cli.common, args).await,
        Command::BenchMqtt(args) => mqtt::bench_mqtt(&cli.common, args).await,
        Command::Idle(args) => idle::idle(&cli.common, args).await,
        #[cfg(unix)]
        Command::Demo(args) => demo::demo(&cli.common, args).await,
        Command::Provision(args) => fleet::credentials(&cli.common, args.devices, true)
            .await
            .map(|_| true),
    };
    match clean {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_WITH_ERRORS),
        Err(e) => {
            eprintln!("device-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
