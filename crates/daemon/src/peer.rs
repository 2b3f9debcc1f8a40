//! What this node answers to its peers: forwarded volume requests (run on
//! the local replica, never forwarded again, so a request cannot loop) and
//! catalog changes. Also the loop that hands inbound Raft messages to the
//! local groups.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;
use trireme_transport::{CatalogChange, ForwardReply, ForwardRequest, Inbound, PeerHandler, Transport};

use crate::catalog::Catalog;
use crate::group::{GroupError, GroupEvent};
use crate::liveness::{Liveness, NODE_GROUP};
use crate::volume::{fwd_code, group_error_to_reply};

/// Bound late: the catalog needs the transport, and the transport this handler.
#[derive(Default)]
pub struct PeerApi {
    pub catalog: OnceLock<Arc<Catalog>>,
}

#[tonic::async_trait]
impl PeerHandler for PeerApi {
    async fn forward(&self, from: u64, req: ForwardRequest) -> ForwardReply {
        let Some(catalog) = self.catalog.get() else {
            return group_error_to_reply(GroupError::Retry("node is starting".into()));
        };
        let volume = match catalog.get(&req.volume) {
            Ok(v) => v,
            Err(e) => return group_error_to_reply(GroupError::Retry(e.to_string())),
        };
        debug!(from, volume = %req.volume, op = req.op, "forwarded request");
        match volume.execute_local(&req).await {
            Ok(data) => ForwardReply {
                errno: fwd_code::OK,
                message: String::new(),
                data,
                leader_hint: 0,
            },
            Err(e) => group_error_to_reply(e),
        }
    }

    async fn catalog(&self, from: u64, change: CatalogChange) -> Result<(), tonic::Status> {
        let catalog = self
            .catalog
            .get()
            .ok_or_else(|| tonic::Status::unavailable("node is starting"))?;
        debug!(from, volume = %change.name, delete = change.delete, "catalog change from a peer");
        catalog.apply_change(change).await.map_err(tonic::Status::from)
    }
}

/// Hands inbound Raft messages to their groups, and tells the groups which
/// peers the transport lost so raft stops pipelining to them.
pub async fn route_inbound(
    catalog: Arc<Catalog>,
    transport: Transport,
    liveness: Arc<Liveness>,
    mut inbound: mpsc::Receiver<Inbound>,
) {
    let mut unreachable_check = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            msg = inbound.recv() => {
                let Some(m) = msg else { break };
                liveness.heard(m.from);
                if m.group_id == NODE_GROUP {
                    continue;
                }
                // A message for a group this node does not run (yet) is
                // dropped; raft retransmits.
                if let Some(g) = catalog.group(m.group_id) {
                    g.try_send(GroupEvent::Raft(m.message));
                }
            }
            _ = unreachable_check.tick() => {
                for peer in transport.take_unreachable() {
                    for g in catalog.all_groups() {
                        g.try_send(GroupEvent::Unreachable(peer));
                    }
                }
            }
        }
    }
}
