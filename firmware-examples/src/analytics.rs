//! An analytics client: extract role. Queries the store and follows live
//! records; its SDK carries the query and follow calls an ingest SDK lacks.

use fleetgate_device_sdk::{Device, LiveMessage};
use serde_json::Value;

pub const DEVICE_TYPE: &str = "analytics";

/// Average temperature per device, through the SDK's query call.
pub async fn temperature_summary(device: &Device) -> anyhow::Result<Value> {
    Ok(device
        .query(
            "SELECT device_id, count(*) AS readings, avg(celsius) AS mean_celsius \
             FROM temperature GROUP BY device_id ORDER BY device_id",
        )
        .await?)
}

/// The next `count` live records on `filter`.
pub async fn follow(
    device: &Device,
    filter: &str,
    count: usize,
) -> anyhow::Result<Vec<LiveMessage>> {
    let mut live = device.follow(filter)?;
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        match live.recv().await {
            Some(message) => seen.push(message),
            None => anyhow::bail!("the device stopped"),
        }
    }
    Ok(seen)
}
