//! The gRPC admin API (trireme.v1): thin translations between the wire
//! messages and the catalog. Every error leaves through the one
//! `DaemonError -> tonic::Status` conversion.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use trireme_proto::v1 as pb;

use trireme_transport::Transport;

use crate::catalog::Catalog;
use crate::error::DaemonError;
use crate::failpoints;
use crate::group::GroupStatus;
use crate::volume::Volume;

pub struct VolumeApi {
    pub catalog: Arc<Catalog>,
    pub node_id: u64,
}

/// Per-replica rows from the leader's view of the group; `down`: nodes the
/// answering node has not heard from lately.
fn replicas(meta_replicas: &[u64], leader: Option<&GroupStatus>, down: &[u64]) -> Vec<pb::Replica> {
    meta_replicas
        .iter()
        .map(|&node_id| {
            let Some(s) = leader else {
                return pb::Replica {
                    node_id,
                    role: "unknown".into(),
                    state: "unknown".into(),
                    ..Default::default()
                };
            };
            let (matched, pstate) = s
                .progress
                .iter()
                .find(|(id, _, _)| *id == node_id)
                .map(|(_, m, st)| (*m, *st))
                .unwrap_or((0, "probe"));
            let lag_entries = s.last_index.saturating_sub(matched);
            let lag_bytes = s
                .lag_bytes
                .iter()
                .find(|(id, _)| *id == node_id)
                .map(|(_, b)| *b)
                .unwrap_or(0);
            let lag_seconds = s
                .lag_seconds
                .iter()
                .find(|(id, _)| *id == node_id)
                .map(|(_, x)| *x)
                .unwrap_or(0.0);
            let (role, state) = if node_id == s.leader {
                ("leader", "healthy")
            } else if pstate == "snapshot" {
                ("follower", "snapshot")
            } else if pstate == "inactive" || down.contains(&node_id) {
                ("follower", "down")
            } else if lag_entries > 0 {
                ("follower", "catching-up")
            } else {
                ("follower", "healthy")
            };
            pb::Replica {
                node_id,
                role: role.into(),
                state: state.into(),
                match_index: if node_id == s.leader { s.last_index } else { matched },
                lag_entries: if node_id == s.leader { 0 } else { lag_entries },
                lag_bytes: if node_id == s.leader { 0 } else { lag_bytes },
                lag_seconds: if node_id == s.leader { 0.0 } else { lag_seconds },
            }
        })
        .collect()
}

/// `detailed`: ask the leader for replica progress (one round trip).
async fn to_proto(v: &Volume, detailed: bool, down: &[u64]) -> pb::Volume {
    let m = v.meta();
    let local = v.local_status();
    let leader_view = if detailed {
        v.leader_view().await
    } else {
        local.clone().filter(|s| s.role == "leader")
    };
    let seen = leader_view.as_ref().or(local.as_ref());
    pb::Volume {
        name: m.name,
        id: m.id,
        size_bytes: v.size_bytes(),
        replica_count: m.replica_count,
        leader: seen.map(|s| s.leader).unwrap_or(0),
        replicas: replicas(&m.replicas, leader_view.as_ref(), down),
        open_sessions: v.open_sessions(),
        created_at_unix_s: m.created_at_unix_s,
        durability: m.durability.as_str().into(),
        allocated_bytes: v.allocated_bytes(),
        epoch: seen.map(|s| s.epoch).unwrap_or(0),
        attached_node: seen.map(|s| s.attached_node).unwrap_or(0),
        term: seen.map(|s| s.term).unwrap_or(0),
        commit_index: seen.map(|s| s.commit_index).unwrap_or(0),
        applied_index: local.as_ref().map(|s| s.applied_index).unwrap_or(0),
        rpo_exposure_seconds: leader_view.as_ref().map(|s| s.rpo_exposure_s).unwrap_or(0.0),
        replicas_in_sync: leader_view.as_ref().map(|s| s.replicas_in_sync as u32).unwrap_or(0),
        last_failover_pause_seconds: leader_view.as_ref().map(|s| s.failover_pause_s).unwrap_or(0.0),
        leader_changes: leader_view.as_ref().map(|s| s.leader_changes).unwrap_or(0),
        hibernating: leader_view.as_ref().is_some_and(|s| s.hibernating),
    }
}

#[tonic::async_trait]
impl pb::volume_service_server::VolumeService for VolumeApi {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self
            .catalog
            .create(&r.name, r.size_bytes, r.replica_count, &r.durability)
            .await?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(to_proto(&v, false, &self.catalog.down_nodes()).await),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        self.catalog.delete(&r.name, r.force).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let mut volumes = Vec::new();
        for v in self.catalog.list() {
            volumes.push(to_proto(&v, false, &self.catalog.down_nodes()).await);
        }
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let v = self.catalog.get(&req.into_inner().name)?;
        Ok(Response::new(pb::GetVolumeResponse {
            volume: Some(to_proto(&v, true, &self.catalog.down_nodes()).await),
        }))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::ResizeVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self.catalog.resize(&r.name, r.new_size_bytes).await?;
        Ok(Response::new(pb::ResizeVolumeResponse {
            volume: Some(to_proto(&v, false, &self.catalog.down_nodes()).await),
        }))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self.catalog.get(&r.name)?;
        if !self.catalog.is_node(r.node_id) {
            return Err(
                DaemonError::InvalidArgument(format!("node_id {} is not a node of this cluster", r.node_id)).into(),
            );
        }
        let before = v.leader_status().await.map(|s| s.epoch).unwrap_or(0);
        v.attach(r.node_id)
            .await
            .map_err(|e| DaemonError::FailedPrecondition(format!("attach failed: {e}")))?;
        // Sessions take their epoch from the replica on their node, so answer
        // once the attached node leads with the new epoch applied: a client
        // connecting there right after this call then writes under it.
        let wants_leader = v.meta().replicas.contains(&r.node_id);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let s = v.leader_status().await;
            let done = s
                .as_ref()
                .is_some_and(|s| s.epoch > before && (!wants_leader || s.leader == r.node_id));
            if done {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::FailedPrecondition(format!(
                    "attach committed, but node {} did not take over the volume within 10 s",
                    r.node_id
                ))
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(Response::new(pb::AttachVolumeResponse {
            volume: Some(to_proto(&v, true, &self.catalog.down_nodes()).await),
        }))
    }
}

pub struct NodeApi {
    pub catalog: Arc<Catalog>,
    pub node_id: u64,
    pub cluster_id: String,
    pub nbd_address: String,
    pub nbd_unix_socket: String,
    pub started: Instant,
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    async fn get_node(&self, _req: Request<pb::GetNodeRequest>) -> Result<Response<pb::GetNodeResponse>, Status> {
        Ok(Response::new(pb::GetNodeResponse {
            node_id: self.node_id,
            cluster_id: self.cluster_id.clone(),
            nbd_address: self.nbd_address.clone(),
            nbd_unix_socket: self.nbd_unix_socket.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
        }))
    }

    async fn get_cluster_status(
        &self,
        _req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
        let down = self.catalog.down_nodes();
        let nodes = self
            .catalog
            .nodes()
            .into_iter()
            .map(|(node_id, addr)| pb::ClusterNode {
                node_id,
                address: addr.to_string(),
                state: if down.contains(&node_id) { "down" } else { "up" }.into(),
            })
            .collect();
        let mut volumes = Vec::new();
        for v in self.catalog.list() {
            let m = v.meta();
            let health = match &v.leader_view().await {
                None => pb::VolumeHealth {
                    name: m.name.clone(),
                    replica_count: m.replica_count,
                    state: "unavailable".into(),
                    ..Default::default()
                },
                Some(s) => {
                    let rebuilding = s.progress.iter().any(|(_, _, st)| *st == "snapshot");
                    let in_sync = s.replicas_in_sync as u32;
                    pb::VolumeHealth {
                        name: m.name.clone(),
                        leader: s.leader,
                        replica_count: m.replica_count,
                        replicas_in_sync: in_sync,
                        rpo_exposure_seconds: s.rpo_exposure_s,
                        state: if rebuilding {
                            "rebuilding"
                        } else if in_sync < m.replica_count {
                            "degraded"
                        } else {
                            "healthy"
                        }
                        .into(),
                        last_failover_pause_seconds: s.failover_pause_s,
                    }
                }
            };
            volumes.push(health);
        }
        let under_replicated = volumes
            .iter()
            .filter(|v| v.state != "unavailable" && v.replicas_in_sync < v.replica_count)
            .count() as u32;
        let unavailable = volumes.iter().filter(|v| v.state == "unavailable").count() as u32;
        let max_rpo_exposure_seconds = volumes.iter().map(|v| v.rpo_exposure_seconds).fold(0.0, f64::max);
        Ok(Response::new(pb::GetClusterStatusResponse {
            answered_by: self.node_id,
            nodes,
            volumes,
            under_replicated,
            unavailable,
            max_rpo_exposure_seconds,
        }))
    }
}

/// Fault injection in this node (see [`crate::failpoints`]); every call
/// is refused in a build without the `failpoints` feature.
pub struct FaultApi {
    pub transport: Transport,
}

#[tonic::async_trait]
impl pb::fault_service_server::FaultService for FaultApi {
    async fn set_net_fault(
        &self,
        req: Request<pb::SetNetFaultRequest>,
    ) -> Result<Response<pb::SetNetFaultResponse>, Status> {
        failpoints::set_net_fault(&self.transport, &req.into_inner())?;
        Ok(Response::new(pb::SetNetFaultResponse {}))
    }

    async fn clear_net_faults(
        &self,
        _req: Request<pb::ClearNetFaultsRequest>,
    ) -> Result<Response<pb::ClearNetFaultsResponse>, Status> {
        failpoints::clear_net_faults(&self.transport)?;
        Ok(Response::new(pb::ClearNetFaultsResponse {}))
    }

    async fn set_failpoint(
        &self,
        req: Request<pb::SetFailpointRequest>,
    ) -> Result<Response<pb::SetFailpointResponse>, Status> {
        let r = req.into_inner();
        failpoints::set_failpoint(&r.name, &r.actions)?;
        Ok(Response::new(pb::SetFailpointResponse {}))
    }

    async fn clear_failpoints(
        &self,
        _req: Request<pb::ClearFailpointsRequest>,
    ) -> Result<Response<pb::ClearFailpointsResponse>, Status> {
        failpoints::clear_failpoints()?;
        Ok(Response::new(pb::ClearFailpointsResponse {}))
    }

    async fn get_faults(&self, _req: Request<pb::GetFaultsRequest>) -> Result<Response<pb::GetFaultsResponse>, Status> {
        Ok(Response::new(failpoints::faults(&self.transport)?))
    }
}
