//! The `gateway` binary: parse the command line, then serve (logging, settings, bind, run)
//! or run one operator CLI command against a gateway's API.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::activation::Inherited;
use gateway::config::{LogFormat, ServeArgs, Settings};
use tokio_util::sync::CancellationToken;

/// IoT device-to-cloud WebSocket gateway.
///
/// Without a command (or with `serve`) it runs the gateway. The other commands are an
/// operator CLI that talks to a running gateway's HTTP API.
#[derive(Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    after_long_help = cli::EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Make a device CA and client certificates for mutual TLS (files only).
    Certs(cli::certs::CertsArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Client(command)) => return cli::run(command),
        Some(Command::Certs(args)) => return cli::certs::run(args),
        None => cli.serve,
    };
    // Before any thread starts: it takes the sockets and clears their variables.
    let inherited = match Inherited::from_env() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = match Settings::load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings, inherited: Inherited) -> Result<(), gateway::GatewayError> {
    let gateway = gateway::Gateway::bind(settings, inherited).await?;
    let line = gateway.listening_line();
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    tracing::info!("{line}");
    let shutdown = CancellationToken::new();
    tokio::spawn(gateway::shutdown::cancel_on_signal(shutdown.clone()));
    gateway.run(shutdown).await
}
