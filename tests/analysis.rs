//! Analyses: per-device hourly statistics, and an anomaly judged against
//! the device's own history, raised on `live/alerts/#` and listed.

use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use serde_json::{json, Value};

use crate::harness::{connect_v5, Backend, Server};
use crate::on_both_backends;

const DAY: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z
const HOUR: i64 = 3_600_000;

const ANALYSIS: &str = r#"
[analyses.temp_hourly]
stream = "temperature"
value = "celsius"
time = "taken_at"
bucket = "1h"
history = 4
threshold = 3.0
"#;

/// Declares `temp_hourly` and sends six hours of readings of two devices,
/// the last hour of d1 far from its history.
pub async fn plant_anomaly(server: &Server) {
    let (status, body) = server
        .post_text("/v1/analyses", &server.admin, ANALYSIS)
        .await;
    assert_eq!(status, 200, "{body}");

    // Two readings an hour for six hours; d1's last hour runs hot, d2's
    // stays as it was. Both devices' usual level differs: each is judged
    // by its own history.
    let hourly = |device: &str| -> Vec<f64> {
        match device {
            "d1" => vec![20.0, 20.6, 19.4, 20.2, 19.8, 31.0],
            _ => vec![30.0, 30.4, 29.6, 30.1, 29.9, 30.2],
        }
    };
    for device in ["d1", "d2"] {
        let mut records = Vec::new();
        for (hour, celsius) in hourly(device).into_iter().enumerate() {
            for half in 0..2 {
                let seq = hour * 2 + half;
                let at = DAY + hour as i64 * HOUR + half as i64 * 1_800_000;
                let wiggle = if half == 0 { -0.1 } else { 0.1 };
                records.push(json!({ "seq": seq, "celsius": celsius + wiggle, "taken_at": at }));
            }
        }
        let (status, body) = server
            .post_text(
                &format!("/v1/ingest/temperature?device={device}"),
                &server.admin,
                &Value::Array(records).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

on_both_backends!(an_hour_far_from_the_devices_history_raises_one_alert);
async fn an_hour_far_from_the_devices_history_raises_one_alert(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let reader = server.add_device("analyst", "extract").await;
    let mut alerts = connect_v5(&server, "analyst", &reader).await.unwrap();
    assert_eq!(
        alerts.subscribe("live/alerts/#").await,
        SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
    );
    plant_anomaly(&server).await;

    let alert = alerts
        .expect(|p| match p {
            Packet::Publish(p) => Some((
                String::from_utf8_lossy(&p.topic).into_owned(),
                serde_json::from_slice::<Value>(&p.payload).unwrap(),
            )),
            _ => None,
        })
        .await;
    assert_eq!(alert.0, "live/alerts/temp_hourly/d1");
    assert_eq!(alert.1["bucket"], DAY + 5 * HOUR);
    assert!(
        (alert.1["mean"].as_f64().unwrap() - 31.0).abs() < 1e-9,
        "{}",
        alert.1
    );

    // The statistics table: every hour of both devices, judged.
    let stats = server
        .wait_for("/v1/alerts", "the alert to be listed", |b| {
            !b["alerts"].as_array().unwrap().is_empty()
        })
        .await;
    assert_eq!(stats["alerts"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(stats["alerts"][0]["device_id"], "d1");
    let rows = server
        .rows(
            "SELECT device_id, bucket, count, mean, min, max, anomaly FROM fga_temp_hourly \
             WHERE device_id = 'd1' ORDER BY bucket",
        )
        .await;
    assert_eq!(rows.len(), 6);
    let last = &rows[5];
    assert_eq!(last[1], json!(DAY + 5 * HOUR));
    assert_eq!(last[2], json!(2));
    assert!((last[3].as_f64().unwrap() - 31.0).abs() < 1e-9);
    assert!((last[4].as_f64().unwrap() - 30.9).abs() < 1e-9);
    assert!((last[5].as_f64().unwrap() - 31.1).abs() < 1e-9);
    assert_eq!(last[6], json!(true));
    // Too little history to judge the first hours; normal hours are not
    // anomalies.
    assert_eq!(rows[0][6], Value::Null);
    assert_eq!(rows[4][6], json!(false));
    let d2 = server
        .count("SELECT count(*) FROM fga_temp_hourly WHERE device_id = 'd2' AND anomaly")
        .await;
    assert_eq!(d2, 0);

    // Bad declarations name the problem.
    for (text, reason) in [
        (
            ANALYSIS.replace("\"celsius\"", "\"status\""),
            "not a numeric field",
        ),
        (
            ANALYSIS.replace("\"temperature\"", "\"nope\""),
            "no stream named",
        ),
        (ANALYSIS.replace("history = 4", "history = 1"), "at least 3"),
    ] {
        let (status, body) = server.post_text("/v1/analyses", &server.admin, &text).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains(reason), "{body}");
    }
}
