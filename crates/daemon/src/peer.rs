//! What this node answers to its peers: forwarded volume requests (run on
//! the local replica, never forwarded again, so a request cannot loop) and
//! catalog changes. Also the router that hands inbound Raft messages to the
//! local groups.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::debug;
use trireme_transport::{CatalogChange, ForwardReply, ForwardRequest, Inbound, InboundRouter, PeerHandler, Transport};

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

/// Hands each inbound Raft message to its group, on the peer stream's task
/// (no routing task in between: one wake-up fewer per message). A message
/// for a group this node does not run (yet), or whose queue is full, is
/// dropped; raft retransmits.
pub fn inbound_router(api: Arc<PeerApi>, liveness: Arc<Liveness>) -> InboundRouter {
    Arc::new(move |m: Inbound| {
        liveness.heard(m.from);
        if m.group_id == NODE_GROUP {
            return;
        }
        if let Some(g) = api.catalog.get().and_then(|c| c.group(m.group_id)) {
            g.try_send(GroupEvent::Raft(m.message));
        }
    })
}

/// Tells the groups which peers the transport lost, so raft stops
/// pipelining to them.
pub async fn report_unreachable(catalog: Arc<Catalog>, transport: Transport) {
    let mut unreachable_check = tokio::time::interval(Duration::from_millis(100));
    loop {
        unreachable_check.tick().await;
        for peer in transport.take_unreachable() {
            for g in catalog.all_groups() {
                g.try_send(GroupEvent::Unreachable(peer));
            }
        }
    }
}
