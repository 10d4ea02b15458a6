//! `gateway certs ca|device`: make a device CA and client certificates for mutual TLS.
//! Works on files only; no gateway needs to run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use gateway::device_certs;

/// `gateway certs ...`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    action: CertsAction,
}

#[derive(Debug, Subcommand)]
enum CertsAction {
    /// Create a device CA: `device-ca.pem` (give it to the gateway with --device-ca) and its
    /// key `device-ca-key.pem` (keep it secret). An existing one is never replaced.
    Ca {
        /// Folder of the device CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue client certificates signed by the device CA, CN = device id: `ID.pem` and
    /// `ID-key.pem` for each id (a device connects with them instead of a token).
    Device {
        /// Device ids (registered in the gateway for the certificate to be accepted).
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Folder of the device CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Where the certificates go [default: DIR/devices].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

/// Runs it: paths written on stdout, one line each; an error is one line on stderr, exit 1.
pub fn run(args: CertsArgs) -> ExitCode {
    let result = match args.action {
        CertsAction::Ca { dir, days } => device_certs::create_device_ca(&dir, days).map(|ca| {
            println!("{}", ca.display());
            eprintln!(
                "gateway: device CA created; start the gateway with --device-ca {} and issue \
                 device certificates with `gateway certs device ID`",
                ca.display()
            );
        }),
        CertsAction::Device {
            ids,
            dir,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| dir.join("devices"));
            ids.iter().try_for_each(|id| {
                device_certs::issue_device_cert(&dir, id, days, &out)
                    .map(|cert| println!("{}", cert.display()))
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
