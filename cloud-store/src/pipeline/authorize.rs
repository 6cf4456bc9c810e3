use fleetgate_protocol::topic::{may_publish, IngestTopic};

use super::{Stage, Work};
use crate::catalog::Catalog;

/// May this principal write these records, and to which stream? Transports
/// check topics too; this stage makes the rule hold for every way in
/// (MQTT, HTTP, UDP, a store node in a cluster).
///
/// It runs first, before the payload is even decoded: a sender that may
/// not write the stream is *refused* ([`Work::refuse`]), not rejected. A
/// refusal is not data, so nothing of it lands in the stream's rejects,
/// where it would pass for something a legitimate writer sent and an
/// intruder could fill them; the transports count it against the device
/// instead, as they do a denied publish.
pub struct Authorize {
    pub catalog: Catalog,
}

impl Stage for Authorize {
    fn process(&self, work: &mut Work) -> Result<(), String> {
        let message = &work.message;
        let topic = format!("ingest/{}/{}", message.stream, message.device_id);
        if !matches!(IngestTopic::parse(&topic), Some(Ok(_))) {
            return Err(format!("{topic:?} is not a valid ingest topic"));
        }
        let principal = &message.principal;
        if let Err(denied) = may_publish(principal.role, &principal.device_id, &topic) {
            work.refuse(denied.0);
            return Ok(());
        }
        let stream = self
            .catalog
            .get(&message.stream)
            .ok_or_else(|| format!("unknown stream {:?}", message.stream))?;
        if let Err(denied) = stream.def.may_write(
            &stream.name,
            principal.role,
            principal.device_type.as_deref(),
        ) {
            work.refuse(denied);
            return Ok(());
        }
        work.stream = Some(stream);
        Ok(())
    }
}
