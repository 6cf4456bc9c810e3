//! `fleetgate-firmware`: the example devices, runnable against `fleetgate up`.

use clap::{Parser, Subcommand};
use fleetgate_firmware_examples::{analytics, pos, thermostat, Cadence, Connect};

#[derive(Parser)]
#[command(
    name = "fleetgate-firmware",
    about = "Example devices on the fleetgate device SDK"
)]
struct Cli {
    #[command(subcommand)]
    device: Example,
}

#[derive(Subcommand)]
enum Example {
    /// Ingest-only: publish temperature readings.
    Thermostat {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        cadence: Cadence,
        #[arg(long, default_value = "hall")]
        room: String,
    },
    /// Ingest-only: record sales.
    Pos {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        cadence: Cadence,
    },
    /// Extract: print a temperature summary, then follow live records.
    Analytics {
        #[command(flatten)]
        connect: Connect,
        /// Topic filter to follow.
        #[arg(long, default_value = "live/#")]
        follow: String,
        /// Live records to print before exiting (0: none).
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().device {
        Example::Thermostat {
            connect,
            cadence,
            room,
        } => {
            let device = connect.start(thermostat::DEVICE_TYPE).await?;
            eprintln!(
                "thermostat {}: {} SDK, role {}",
                connect.id,
                device.target(),
                device.role()
            );
            let sent = thermostat::run(&device, &room, &cadence).await?;
            println!("sent {sent} readings, all acknowledged");
        }
        Example::Pos { connect, cadence } => {
            let device = connect.start(pos::DEVICE_TYPE).await?;
            eprintln!(
                "terminal {}: {} SDK, role {}",
                connect.id,
                device.target(),
                device.role()
            );
            let total = pos::run(&device, &connect.id, &cadence).await?;
            println!("recorded sales worth {total:.2}, all acknowledged");
        }
        Example::Analytics {
            connect,
            follow,
            count,
        } => {
            let device = connect.start(analytics::DEVICE_TYPE).await?;
            let summary = analytics::temperature_summary(&device).await?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            if count > 0 {
                for message in analytics::follow(&device, &follow, count).await? {
                    println!(
                        "{} {}",
                        message.topic,
                        String::from_utf8_lossy(&message.payload)
                    );
                }
            }
        }
    }
    Ok(())
}
