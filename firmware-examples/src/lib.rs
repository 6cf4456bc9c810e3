//! Example firmware on fleetgate-device-sdk. Each device starts with
//! [`Device::start`](fleetgate_device_sdk::Device::start) (handshake, verified
//! SDK, MQTT) and then does its one job; the binary `fleetgate-firmware`
//! runs them against a server (see the README).

pub mod analytics;
pub mod pos;
pub mod thermostat;

use std::path::PathBuf;
use std::time::Duration;

use fleetgate_device_sdk::identity::{read_public_key, DeviceKey};
use fleetgate_device_sdk::{Device, DeviceConfig};
use fleetgate_protocol::sdk::Target;

/// What every example device needs to reach the platform.
#[derive(clap::Args, Clone, Debug)]
pub struct Connect {
    /// The platform's HTTP API (as for the fleetgate CLI, FLEETGATE_SERVER).
    #[arg(
        long,
        env = "FLEETGATE_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Device id, as registered with `fleetgate device add`.
    #[arg(long)]
    pub id: String,
    /// Directory with device.key (from `fleetgate device keygen`); the
    /// offline queue lives here too.
    #[arg(long)]
    pub key_dir: PathBuf,
    /// The platform's public key: the server's <data>/platform.pub.
    #[arg(long, default_value = "fleetgate-data/platform.pub")]
    pub platform_key: PathBuf,
    /// SDK artifact: wasm, x86_64, aarch64, riscv64, pulley32, pulley64
    /// (default: native code for this machine).
    #[arg(long)]
    pub target: Option<Target>,
    /// CA certificate (PEM) to trust when --server is https:// (e.g. the
    /// server's fleetgate-data/dev-tls/ca.pem); the device then uses TLS only.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl Connect {
    pub async fn start(&self, device_type: &str) -> anyhow::Result<Device> {
        let key = DeviceKey::load(&self.key_dir).map_err(anyhow::Error::msg)?;
        let platform_key = read_public_key(&self.platform_key).map_err(anyhow::Error::msg)?;
        let mut config = DeviceConfig::new(
            &self.server,
            &self.id,
            device_type,
            key,
            platform_key,
            self.key_dir.join("queue"),
        );
        config.target = self.target;
        config.ca_pem = match &self.ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok(Device::start(config).await?)
    }
}

/// How many records to send and how often.
#[derive(clap::Args, Clone, Debug)]
pub struct Cadence {
    /// Records to send; 0 runs until stopped.
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Time between records.
    #[arg(long, default_value = "1s", value_parser = fleetgate_protocol::duration::parse)]
    pub every: Duration,
}
