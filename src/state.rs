//! Cluster state rollout in the binary: how the coordinator reaches the
//! stores in each mode ([`LocalStores`] for `up`, [`ClusterStores`] for
//! `fleetgate broker`) and the retained `$fleet/state/<key>` topics
//! ([`StateTopicFeed`]). The HTTP routes behind `fleetgate state` are
//! `fleetgate_api::http`'s.

use std::sync::Arc;
use std::time::Duration;

use fleetgate_admin::rollout::StateTransport;
use fleetgate_broker::balancer::Balancer;
use fleetgate_broker::PlatformTopics;
use fleetgate_protocol::ingest::BoxFuture;
use fleetgate_protocol::node::{encode_command, read_frame, write_frame, NodeCommand, NodeFrame};
use fleetgate_protocol::state::{ClusterClock, StateAnnouncement, StateKey, StateValue};
use fleetgate_protocol::topic::state_topic;
use fleetgate_store::state::{self as store_state, StateFollower, LOCAL_NODE, STATE_CHANNEL};
use fleetgate_store::{nodes, Db};
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// Keeps the gatekeeper's retained `$fleet/state/<key>` topics on each
/// key's newest published version: its number, activation time and
/// document, for operators and analytics clients to watch.
#[derive(Clone)]
pub struct StateTopicFeed {
    pub db: Db,
    pub topics: PlatformTopics,
}

impl StateTopicFeed {
    pub async fn refresh(&self) -> Result<(), String> {
        for row in store_state::newest_per_key(&self.db).await? {
            let topic = state_topic(&row.key);
            if self.topics.revision(&topic) >= Some(row.version) {
                continue;
            }
            let document = store_state::document(&self.db, row.version).await?;
            let value: Value = serde_json::from_str(&document)
                .map_err(|e| format!("state version {} is corrupt: {e}", row.version))?;
            let payload = json!({
                "key": row.key,
                "version": row.version,
                "activate_at_ms": row.activate_at_ms,
                "sha256": row.sha256,
                "value": value,
            });
            self.topics
                .retain(&topic, row.version, payload.to_string().into());
        }
        Ok(())
    }

    /// [`Self::refresh`], whose failure only delays an announcement: the
    /// next refresh catches up.
    pub async fn refresh_or_warn(&self) {
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "cannot refresh the state topics");
        }
    }
}

/// `up`: the store is in this process.
pub struct LocalStores {
    pub db: Db,
    pub follower: StateFollower,
    pub feed: StateTopicFeed,
}

impl StateTransport for LocalStores {
    fn stage(
        &self,
        version: u64,
        key: &StateKey,
        value: &StateValue,
    ) -> BoxFuture<'_, Result<String, String>> {
        let (key, value) = (key.clone(), value.clone());
        Box::pin(async move {
            store_state::stage(&self.db, version, &key, &value, LOCAL_NODE).await?;
            Ok(LOCAL_NODE.to_string())
        })
    }

    fn announce(&self, announcement: &StateAnnouncement) -> BoxFuture<'_, ()> {
        let announcement = announcement.clone();
        Box::pin(async move {
            if let Err(e) = self.follower.learn(announcement).await {
                tracing::error!(error = %e, "the local store cannot take in the state version");
            }
            self.feed.refresh_or_warn().await;
        })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async { Ok(vec![LOCAL_NODE.to_string()]) })
    }

    fn reboot(&self, _node: &str, reason: &str) -> BoxFuture<'_, Result<(), String>> {
        tracing::warn!(reason, "reloading the local store's state");
        Box::pin(self.follower.load())
    }
}

/// `fleetgate broker`: the stores are the cluster's nodes.
pub struct ClusterStores {
    pub db: Db,
    pub balancer: Balancer,
    pub feed: StateTopicFeed,
}

impl StateTransport for ClusterStores {
    /// The first live node (by id) that persists it; the others if it fails.
    fn stage(
        &self,
        version: u64,
        key: &StateKey,
        value: &StateValue,
    ) -> BoxFuture<'_, Result<String, String>> {
        let command = NodeCommand::Stage {
            version,
            key: key.to_string(),
            value: serde_json::to_value(value).expect("state serializes"),
        };
        Box::pin(async move {
            let mut errors = Vec::new();
            for node in nodes::live(&self.db).await? {
                match tokio::time::timeout(Duration::from_secs(5), send_command(&node, &command))
                    .await
                {
                    Ok(Ok(())) => return Ok(node.id),
                    Ok(Err(e)) => errors.push(format!("{}: {e}", node.id)),
                    Err(_) => errors.push(format!("{}: no answer within 5 s", node.id)),
                }
                // A node that failed may have persisted it anyway: the
                // version number is spent, so stop rather than stage twice.
                if store_state::version_row(&self.db, version).await?.is_some() {
                    return Err(format!(
                        "{} (version {version} was persisted; it will be abandoned)",
                        errors.join("; ")
                    ));
                }
            }
            if errors.is_empty() {
                Err("no store node is up".into())
            } else {
                Err(errors.join("; "))
            }
        })
    }

    fn announce(&self, announcement: &StateAnnouncement) -> BoxFuture<'_, ()> {
        let announcement = announcement.clone();
        Box::pin(async move {
            self.balancer
                .announce(announcement.version, announcement.activate_at_ms);
            let payload = serde_json::to_string(&announcement).expect("announcement serializes");
            self.db.notify(STATE_CHANNEL, &payload).await;
            self.feed.refresh_or_warn().await;
        })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async move {
            Ok(nodes::live(&self.db)
                .await?
                .into_iter()
                .map(|n| n.id)
                .collect())
        })
    }

    fn reboot(&self, node: &str, reason: &str) -> BoxFuture<'_, Result<(), String>> {
        let (node, reason) = (node.to_string(), reason.to_string());
        Box::pin(async move { nodes::request_reboot(&self.db, &node, &reason).await })
    }
}

async fn send_command(node: &nodes::NodeRow, command: &NodeCommand) -> Result<(), String> {
    let stream = TcpStream::connect(&node.addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut reader, mut writer) = stream.into_split();
    let sent = async {
        write_frame(&mut writer, node.secret.as_bytes()).await?;
        write_frame(&mut writer, &encode_command(command)).await
    };
    sent.await.map_err(|e| format!("cannot send: {e}"))?;
    // The node also says which state versions it holds; skip that.
    loop {
        let body = read_frame(&mut reader)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?
            .ok_or("the node closed the connection")?;
        match serde_json::from_slice(&body) {
            Ok(NodeFrame::Command(answer)) => return answer.result,
            Ok(_) => continue,
            Err(e) => return Err(format!("unreadable answer: {e}")),
        }
    }
}

/// Keeps the broker's clock synchronized with the database's, and its
/// balancer's schedule and state topics on every published version,
/// including those other brokers publish.
pub fn follow_schedule(db: Db, balancer: Balancer, clock: Arc<ClusterClock>, feed: StateTopicFeed) {
    let (follower, notified_feed) = (balancer.clone(), feed.clone());
    db.follow(STATE_CHANNEL, move |payload| {
        let (balancer, feed) = (follower.clone(), notified_feed.clone());
        async move {
            if let Some(Ok(a)) = payload.map(|p| serde_json::from_str::<StateAnnouncement>(&p)) {
                balancer.announce(a.version, a.activate_at_ms);
            }
            feed.refresh_or_warn().await;
        }
    });
    tokio::spawn(async move {
        loop {
            let _ = store_state::sync_clock(&db, &clock).await;
            match store_state::published(&db, 8).await {
                Ok(rows) => {
                    for row in &rows {
                        balancer.announce(row.version, row.activate_at_ms.unwrap_or(0));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read state versions"),
            }
            feed.refresh_or_warn().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
