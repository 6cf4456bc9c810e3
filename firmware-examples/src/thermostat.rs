//! A thermostat: ingest-only, publishes a temperature reading every
//! `--every` to the `temperature` stream.

use std::time::Duration;

use fleetgate_device_sdk::Device;

use crate::Cadence;

pub const DEVICE_TYPE: &str = "thermostat";

/// Publishes `cadence.count` readings (forever when 0), then waits until
/// the broker has acknowledged all of them. Returns how many were sent.
pub async fn run(device: &Device, room: &str, cadence: &Cadence) -> anyhow::Result<u64> {
    let mut ticker = tokio::time::interval(cadence.every);
    let mut seq = 0u64;
    while cadence.count == 0 || seq < cadence.count {
        ticker.tick().await;
        // A slow sine around 21 °C stands in for the sensor.
        let celsius = 21.0 + 3.0 * (seq as f64 / 30.0).sin();
        device.publish(
            "temperature",
            &[
                ("seq", (seq as i64).into()),
                ("celsius", ((celsius * 100.0).round() / 100.0).into()),
                ("room", room.into()),
            ],
        )?;
        seq += 1;
    }
    device.flush(Duration::from_secs(60)).await?;
    Ok(seq)
}
