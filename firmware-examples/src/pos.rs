//! A point-of-sale terminal: ingest-only, records each sale in the `sales`
//! stream, keyed by order number so a resent sale is stored once.

use std::time::Duration;

use fleetgate_device_sdk::Device;

use crate::Cadence;

pub const DEVICE_TYPE: &str = "pos-terminal";

const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];

/// Rings up `cadence.count` sales (forever when 0) and waits until all are
/// acknowledged. Returns their total amount.
pub async fn run(device: &Device, terminal: &str, cadence: &Cadence) -> anyhow::Result<f64> {
    let mut ticker = tokio::time::interval(cadence.every);
    let (mut n, mut total) = (0u64, 0.0);
    while cadence.count == 0 || n < cadence.count {
        ticker.tick().await;
        let items = 1 + (n % 4) as i64;
        let amount = items as f64 * 4.5;
        device.publish(
            "sales",
            &[
                ("order_id", format!("{terminal}-{n:06}").into()),
                ("amount", amount.into()),
                ("currency", CURRENCIES[(n % 3) as usize].into()),
                ("items", items.into()),
            ],
        )?;
        total += amount;
        n += 1;
    }
    device.flush(Duration::from_secs(60)).await?;
    Ok(total)
}
