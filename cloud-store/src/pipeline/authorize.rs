use fleetgate_protocol::topic::{may_publish, IngestTopic};

use super::{Stage, Work};
use crate::catalog::Catalog;

/// May this principal write these records, and to which stream? Transports
/// check topics too; this stage makes the rule hold for every way in.
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
        may_publish(message.principal.role, &message.principal.device_id, &topic)
            .map_err(|d| d.0)?;
        let stream = self
            .catalog
            .get(&message.stream)
            .ok_or_else(|| format!("unknown stream {:?}", message.stream))?;
        work.stream = Some(stream);
        Ok(())
    }
}
