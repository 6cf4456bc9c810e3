//! The compact binary record (`FGB1`): the decoder, and the store's ingest
//! pipeline (Authorize, Decode, Validate, Enrich, Bucket) that the decoded
//! record goes through, on the fixture's streams.
//!
//! Input: one byte choosing the stream (low four bits, an index into the
//! sorted stream names) and the sender (bits 4-5), then the payload
//! exactly as a device publishes it. A record that decodes must encode
//! back to the same bytes (the format has one encoding per record), and
//! every record the pipeline keeps must have one value per insert column.

#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fleetgate_fuzz::{store, NOW_MS};
use fleetgate_protocol::record::{self, FieldValue};
use fleetgate_protocol::{IngestMessage, Principal, Role};
use fleetgate_store::pipeline::Pipeline;
use fleetgate_store::state::StateSet;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The server's default `--max-payload`.
const MAX_PAYLOAD: usize = 256 * 1024;

fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| Pipeline::standard(store().catalog.clone(), MAX_PAYLOAD))
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, payload)) = data.split_first() else {
        return;
    };

    if let Ok(decoded) = record::decode(payload) {
        let fields: Vec<(&str, FieldValue)> = decoded
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    Value::Number(n) if n.is_i64() => FieldValue::Int(n.as_i64().unwrap()),
                    Value::Number(n) => FieldValue::Float(n.as_f64().expect("a finite float")),
                    Value::Bool(b) => FieldValue::Bool(*b),
                    Value::String(s) => FieldValue::Text(s.clone()),
                    other => panic!("decoded a {other}"),
                };
                (name.as_str(), value)
            })
            .collect();
        match record::encode(&fields) {
            Ok(encoded) => assert_eq!(encoded, payload, "one encoding per record"),
            // The reference encoder refuses empty names; the decoder takes
            // them (as JSON does), and they land in `extra`.
            Err(_) => assert!(fields.iter().any(|(name, _)| name.is_empty())),
        }
    }

    let store = store();
    let streams = store.catalog.names();
    let stream = &streams[(choice & 0x0f) as usize % streams.len()];
    let (role, device_type) = match (choice >> 4) & 0b11 {
        0 => (Role::Ingest, Some("till")),
        1 => (Role::Ingest, None),
        2 => (Role::Extract, Some("thermostat")),
        _ => (Role::Admin, None),
    };
    let device = "sensor-1".to_string();
    let message = IngestMessage {
        principal: Principal {
            device_id: device.clone(),
            role,
            device_type: device_type.map(String::from),
            expires_at: NOW_MS / 1000 + 3600,
        },
        stream: stream.clone(),
        device_id: device,
        payload: Bytes::copy_from_slice(payload),
        truncated_from: None,
        received_at_ms: NOW_MS,
        state_version: None,
    };
    let work = pipeline().run(message, Arc::new(StateSet::default()));
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        let stored: Vec<_> = work.records.iter().map(|r| &r.values).collect();
        eprintln!(
            "{stream}: refused {:?}, rejects {:?}, stored {stored:?}",
            work.refused, work.rejects
        );
    }
    if let Some(stream) = &work.stream {
        for record in &work.records {
            assert_eq!(record.values.len(), stream.columns.len());
        }
    }
});
