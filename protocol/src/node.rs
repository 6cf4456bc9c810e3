//! The gatekeeper ↔ store node link in cluster mode: ingest messages go to
//! a node over one TCP connection, pipelined, and each answer comes back
//! after the node's commit, in the order the messages were sent.
//!
//! Every frame is `u32 LE length` then the body. The first frame from the
//! gatekeeper is the node's secret (from its row in `fleetgate_nodes`):
//! only a process that can read the cluster's database may send records.
//! A request body is `u32 LE header length`, a JSON [`NodeRequest`], then
//! the payload; everything the node sends is a JSON [`NodeFrame`]: answers,
//! and the state versions it holds (at connect and on every change: that is
//! how a node confirms a state activation to the gatekeeper).
//!
//! A request header may also be a [`NodeCommand`] (the admin service uses a
//! connection of its own for one), answered by a [`CommandAnswer`] frame.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{IngestError, IngestMessage, IngestOutcome, Principal, Role};

/// Frames larger than this are refused: a payload is bounded by the
/// gatekeeper's `--max-payload`, far below.
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRequest {
    pub seq: u64,
    pub principal: String,
    pub role: Role,
    /// The sender's device type, for streams that name their writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_type: Option<String>,
    pub principal_expires_at: i64,
    pub stream: String,
    pub device_id: String,
    pub truncated_from: Option<usize>,
    pub received_at_ms: i64,
    pub state_version: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeResponse {
    pub seq: u64,
    pub result: Result<IngestOutcome, IngestError>,
}

/// The state versions a node can process requests under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVersions {
    pub active: u64,
    /// The version before `active`, kept so that requests routed just
    /// before an activation are still processed under their version.
    pub previous: Option<u64>,
}

impl HeldVersions {
    pub fn holds(&self, version: u64) -> bool {
        self.active == version || self.previous == Some(version)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NodeFrame {
    Answer(NodeResponse),
    Versions(HeldVersions),
    Command(CommandAnswer),
}

/// Control requests from the admin service to one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NodeCommand {
    /// Persist this state document as the given version, not yet in force.
    Stage {
        version: u64,
        key: String,
        value: serde_json::Value,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandAnswer {
    pub result: Result<(), String>,
}

/// The first frame of a control connection (after the secret).
pub fn encode_command(command: &NodeCommand) -> Vec<u8> {
    let header = serde_json::to_vec(command).expect("command serializes");
    [&(header.len() as u32).to_le_bytes()[..], &header].concat()
}

/// What a request frame holds: ingest, or a command.
pub enum Request {
    Ingest(u64, IngestMessage),
    Command(NodeCommand),
}

pub async fn write_frame<W: AsyncWrite + Unpin>(out: &mut W, body: &[u8]) -> std::io::Result<()> {
    out.write_all(&(body.len() as u32).to_le_bytes()).await?;
    out.write_all(body).await
}

/// The next frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(input: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0; len];
    input.read_exact(&mut body).await?;
    Ok(Some(body))
}

pub fn encode_request(seq: u64, message: &IngestMessage) -> Vec<u8> {
    let header = serde_json::to_vec(&NodeRequest {
        seq,
        principal: message.principal.device_id.clone(),
        role: message.principal.role,
        principal_type: message.principal.device_type.clone(),
        principal_expires_at: message.principal.expires_at,
        stream: message.stream.clone(),
        device_id: message.device_id.clone(),
        truncated_from: message.truncated_from,
        received_at_ms: message.received_at_ms,
        state_version: message.state_version,
    })
    .expect("request header serializes");
    let mut body = Vec::with_capacity(4 + header.len() + message.payload.len());
    body.extend_from_slice(&(header.len() as u32).to_le_bytes());
    body.extend_from_slice(&header);
    body.extend_from_slice(&message.payload);
    body
}

pub fn decode_request(body: Vec<u8>) -> Result<Request, String> {
    let header_len = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or("request frame too short")?;
    let header = body
        .get(4..4 + header_len)
        .ok_or("request header truncated")?;
    let request: NodeRequest = match serde_json::from_slice(header) {
        Ok(request) => request,
        Err(e) => {
            return serde_json::from_slice(header)
                .map(Request::Command)
                .map_err(|_| format!("request header: {e}"))
        }
    };
    let payload = Bytes::from(body).slice(4 + header_len..);
    Ok(Request::Ingest(
        request.seq,
        IngestMessage {
            principal: Principal {
                device_id: request.principal,
                role: request.role,
                device_type: request.principal_type,
                expires_at: request.principal_expires_at,
            },
            stream: request.stream,
            device_id: request.device_id,
            payload,
            truncated_from: request.truncated_from,
            received_at_ms: request.received_at_ms,
            state_version: request.state_version,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_and_frames_round_trip() {
        let message = IngestMessage {
            principal: Principal {
                device_id: "t1".into(),
                role: Role::Ingest,
                device_type: Some("thermostat".into()),
                expires_at: 9,
            },
            stream: "temperature".into(),
            device_id: "t1".into(),
            payload: Bytes::from_static(b"{\"seq\":1}"),
            truncated_from: None,
            received_at_ms: 5,
            state_version: Some(3),
        };
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &encode_request(7, &message))
            .await
            .unwrap();
        drop(a);
        let body = read_frame(&mut b).await.unwrap().unwrap();
        let Ok(Request::Ingest(seq, decoded)) = decode_request(body) else {
            panic!("not an ingest request")
        };
        assert_eq!(decoded.state_version, Some(3));
        assert_eq!(seq, 7);
        assert_eq!(decoded.payload, message.payload);
        assert_eq!(decoded.principal, message.principal);
        assert_eq!(
            (decoded.stream, decoded.device_id),
            ("temperature".into(), "t1".into())
        );
        assert!(read_frame(&mut b).await.unwrap().is_none());
        assert!(decode_request(vec![200, 0, 0, 0, b'{']).is_err());
        let command = NodeCommand::Stage {
            version: 4,
            key: "rules/t".into(),
            value: serde_json::json!({"x": 1}),
        };
        let Ok(Request::Command(NodeCommand::Stage { version, key, .. })) =
            decode_request(encode_command(&command))
        else {
            panic!("not a command")
        };
        assert_eq!((version, key.as_str()), (4, "rules/t"));
    }
}
