//! The gRPC admin API (trireme.v1): thin translations between the wire
//! messages and the catalog. Every error leaves through the one
//! `DaemonError -> tonic::Status` conversion.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use trireme_proto::v1 as pb;

use crate::catalog::{Catalog, LocalVolume};

pub struct VolumeApi {
    pub catalog: Arc<Catalog>,
    pub node_id: u64,
}

fn to_proto(v: &LocalVolume, node_id: u64) -> pb::Volume {
    let m = v.meta();
    let state = if v.is_failed() { "failed" } else { "healthy" };
    pb::Volume {
        name: m.name,
        id: m.id,
        size_bytes: v.size_bytes(),
        replica_count: m.replica_count,
        leader: node_id,
        replicas: vec![pb::Replica {
            node_id,
            role: "leader".into(),
            state: state.into(),
        }],
        open_sessions: v.open_sessions(),
        created_at_unix_s: m.created_at_unix_s,
        durability: "local-fsync".into(),
        allocated_bytes: v.store().allocated_bytes(),
    }
}

#[tonic::async_trait]
impl pb::volume_service_server::VolumeService for VolumeApi {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self.catalog.create(&r.name, r.size_bytes, r.replica_count).await?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(to_proto(&v, self.node_id)),
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
        let volumes = self.catalog.list().iter().map(|v| to_proto(v, self.node_id)).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let v = self.catalog.get(&req.into_inner().name)?;
        Ok(Response::new(pb::GetVolumeResponse {
            volume: Some(to_proto(&v, self.node_id)),
        }))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::ResizeVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = self.catalog.resize(&r.name, r.new_size_bytes).await?;
        Ok(Response::new(pb::ResizeVolumeResponse {
            volume: Some(to_proto(&v, self.node_id)),
        }))
    }
}

pub struct NodeApi {
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
}
