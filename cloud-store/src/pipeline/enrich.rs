use super::{SqlValue, Stage, Work};

/// Adds what the platform knows and the device does not say: which device
/// sent the record and when it arrived. Values go to the two leading columns.
pub struct Enrich;

impl Stage for Enrich {
    fn process(&self, work: &mut Work) -> Result<(), String> {
        let device = &work.message.device_id;
        let received_at = work.message.received_at_ms;
        for record in &mut work.records {
            record.values[0] = SqlValue::Text(device.clone());
            record.values[1] = SqlValue::Int(received_at);
        }
        Ok(())
    }
}
