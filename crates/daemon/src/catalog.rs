//! The node's volume catalog: DATA_DIR/volumes/ID/{volume.meta, image,
//! volume.state}, and the Raft groups of the local replicas.
//!
//! Every node keeps the catalog entry of every volume (so it can serve its
//! export and route to its leader); replica nodes also keep the image and
//! run the group. Catalog changes are pushed by the node that took the admin
//! call to every node over the peer transport. Creation builds a volume in a
//! hidden directory and renames it into place, deletion renames it away
//! before removing it, so a crash leaves a volume whole or absent.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use trireme_nbd::{ExportInfo, ExportRegistry, OpenedExport};
use trireme_raftlog::RaftLogStore;
use trireme_replica::raft::eraftpb::ConfState;
use trireme_replica::{Replica, ReplicaConfig, VolumeState};
use trireme_storage::BlockStore;
use trireme_storage::statefile;
use trireme_storage::uring::{IoEngine, UringStore};
use trireme_transport::{CatalogChange, Transport};

use crate::error::{DaemonError, Result};
use crate::group::{self, GroupEvent, GroupHandle};
use crate::liveness::Liveness;
use crate::logwriter::LogWriter;
use crate::volume::{Durability, LocalReplica, Volume, VolumeMeta, VolumeSession};

const META_MAGIC: &[u8; 8] = b"TRIVOLM\0";
const META_VERSION: u32 = 2;
const META_FILE: &str = "volume.meta";
const IMAGE_FILE: &str = "image";
const STATE_MAGIC: &[u8; 8] = b"TRIVOLS\0";
const STATE_VERSION: u32 = 1;
const STATE_FILE: &str = "volume.state";
/// Sizes are whole 4 KiB blocks, so every client can address the last byte.
pub const VOLUME_BLOCK_BYTES: u64 = 4096;
/// ext4's largest file with 4 KiB blocks.
pub const MAX_VOLUME_BYTES: u64 = 16 * 1024 * 1024 * 1024 * 1024 - VOLUME_BLOCK_BYTES;
const MAX_NAME_CHARS: usize = 64;
/// How long a forced delete waits for revoked sessions to close.
const REVOKE_WAIT: Duration = Duration::from_secs(10);

/// The state machine as of the destaged index (volume.state): what the
/// image holds plus the fencing state, so the log below it can go.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedState {
    pub destaged_index: u64,
    pub epoch: u64,
    pub attached_node: u64,
}

/// Marks the stand-in entry a snapshot install leaves at the start of the
/// durable log, with the epoch and attached node as of that point.
const SNAPSHOT_POINT_MAGIC: &[u8; 8] = b"TRISNAP1";

pub fn snapshot_point_data(epoch: u64, attached_node: u64) -> Vec<u8> {
    let mut v = SNAPSHOT_POINT_MAGIC.to_vec();
    v.extend_from_slice(&epoch.to_le_bytes());
    v.extend_from_slice(&attached_node.to_le_bytes());
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// (epoch, attached node) if `data` is a snapshot point marker.
fn parse_snapshot_point(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() != 28 || &data[..8] != SNAPSHOT_POINT_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(data[24..28].try_into().ok()?);
    if crc32c::crc32c(&data[..24]) != crc {
        return None;
    }
    let epoch = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let attached = u64::from_le_bytes(data[16..24].try_into().ok()?);
    Some((epoch, attached))
}

pub fn write_applied_state(path: &Path, s: &AppliedState) -> std::result::Result<(), trireme_storage::StorageError> {
    let body = serde_json::to_vec(s).unwrap_or_default();
    statefile::write_atomic(path, STATE_MAGIC, STATE_VERSION, &body)
}

fn read_applied_state(path: &Path) -> Result<AppliedState> {
    if !path.exists() {
        return Ok(AppliedState::default());
    }
    let (version, body) = statefile::read(path, STATE_MAGIC)?;
    if version != STATE_VERSION {
        return Err(DaemonError::DataDir {
            path: path.into(),
            reason: format!("unsupported version {version}"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| DaemonError::DataDir {
        path: path.into(),
        reason: format!("volume.state body: {e}"),
    })
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(DaemonError::InvalidArgument(format!(
            "volume name \"{name}\" must be 1-{MAX_NAME_CHARS} characters of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

pub fn validate_size(field: &str, size_bytes: u64) -> Result<()> {
    if size_bytes == 0 {
        return Err(DaemonError::InvalidArgument(format!("{field} must be positive")));
    }
    if !size_bytes.is_multiple_of(VOLUME_BLOCK_BYTES) {
        return Err(DaemonError::InvalidArgument(format!(
            "{field} {size_bytes} is not a multiple of {VOLUME_BLOCK_BYTES}"
        )));
    }
    if size_bytes > MAX_VOLUME_BYTES {
        return Err(DaemonError::InvalidArgument(format!(
            "{field} {size_bytes} exceeds the maximum volume size {MAX_VOLUME_BYTES}"
        )));
    }
    Ok(())
}

fn new_volume_id() -> Result<(String, u64)> {
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| DaemonError::io("reading /dev/urandom for a volume id", e))?;
    // Group id 0 is never used, so "no group" can be 0.
    let group = u64::from_be_bytes(b).max(1);
    Ok((format!("{group:016x}"), group))
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_meta(dir: &Path, meta: &VolumeMeta) -> Result<()> {
    let body = serde_json::to_vec(meta).map_err(|e| DaemonError::io("encoding volume meta", e.into()))?;
    statefile::write_atomic(&dir.join(META_FILE), META_MAGIC, META_VERSION, &body)?;
    Ok(())
}

/// volume.meta version 1 (single-node releases) had no group and replicas.
#[derive(Deserialize)]
struct VolumeMetaV1 {
    id: String,
    name: String,
    size_bytes: u64,
    replica_count: u32,
    created_at_unix_s: u64,
}

fn read_meta(dir: &Path, node_id: u64) -> Result<VolumeMeta> {
    let path = dir.join(META_FILE);
    let (version, body) = statefile::read(&path, META_MAGIC)?;
    let bad = |e: serde_json::Error| DaemonError::DataDir {
        path: path.clone(),
        reason: format!("volume.meta body: {e}"),
    };
    match version {
        1 => {
            let v1: VolumeMetaV1 = serde_json::from_slice(&body).map_err(bad)?;
            let group_id = u64::from_str_radix(&v1.id, 16).unwrap_or(1).max(1);
            Ok(VolumeMeta {
                id: v1.id,
                name: v1.name,
                size_bytes: v1.size_bytes,
                replica_count: v1.replica_count,
                created_at_unix_s: v1.created_at_unix_s,
                group_id,
                replicas: vec![node_id],
                durability: Durability::QuorumFsync,
            })
        }
        META_VERSION => serde_json::from_slice(&body).map_err(bad),
        v => Err(DaemonError::DataDir {
            path,
            reason: format!("unsupported volume.meta version {v}"),
        }),
    }
}

/// A durability mode from a request; `what` names the field in the error.
fn durability_arg(what: &str, s: &str) -> Result<Durability> {
    Durability::parse(s).ok_or_else(|| {
        DaemonError::InvalidArgument(format!("{what} {s:?} must be one of {}", Durability::NAMES.join(", ")))
    })
}

fn change_of(meta: &VolumeMeta, delete: bool) -> CatalogChange {
    CatalogChange {
        name: meta.name.clone(),
        id: meta.id.clone(),
        size_bytes: meta.size_bytes,
        replicas: meta.replicas.clone(),
        group_id: meta.group_id,
        delete,
        created_at_unix_s: meta.created_at_unix_s,
        durability: meta.durability.as_str().to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartMode {
    /// A new volume's replica.
    Create,
    /// An existing replica restarted from its image and log.
    Restart,
    /// A replica whose data was lost, starting empty to be rebuilt.
    Rebuild,
}

/// The node-wide services every local replica uses.
pub struct NodeServices {
    pub engine: IoEngine,
    pub log: Arc<dyn RaftLogStore>,
    pub log_writer: LogWriter,
    pub transport: Transport,
    pub liveness: Arc<Liveness>,
    /// Every cluster node and its peer address.
    pub nodes: BTreeMap<u64, SocketAddr>,
    pub checkpoints: group::Checkpoints,
}

pub struct Catalog {
    node_id: u64,
    checkpoints: group::Checkpoints,
    liveness: Arc<Liveness>,
    volumes_dir: PathBuf,
    engine: IoEngine,
    log: Arc<dyn RaftLogStore>,
    log_writer: LogWriter,
    transport: Transport,
    nodes: BTreeMap<u64, SocketAddr>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    groups: RwLock<HashMap<u64, GroupHandle>>,
    /// Serialises create/delete/resize so their on-disk steps never interleave.
    admin_lock: tokio::sync::Mutex<()>,
}

impl Catalog {
    /// Opens every volume under `data_dir/volumes` and restarts the local
    /// replicas from the durable log; refuses to start on a corrupt file
    /// (naming it) rather than serve without it.
    pub fn load(node_id: u64, data_dir: &Path, services: NodeServices) -> Result<Catalog> {
        let NodeServices {
            engine,
            log,
            log_writer,
            transport,
            liveness,
            nodes,
            checkpoints,
        } = services;
        let volumes_dir = data_dir.join("volumes");
        fs::create_dir_all(&volumes_dir).map_err(|e| DaemonError::io(volumes_dir.display().to_string(), e))?;
        let catalog = Catalog {
            node_id,
            liveness,
            volumes_dir: volumes_dir.clone(),
            engine,
            log,
            log_writer,
            transport,
            nodes,
            checkpoints,
            volumes: RwLock::new(BTreeMap::new()),
            groups: RwLock::new(HashMap::new()),
            admin_lock: tokio::sync::Mutex::new(()),
        };
        let entries = fs::read_dir(&volumes_dir).map_err(|e| DaemonError::io(volumes_dir.display().to_string(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DaemonError::io(volumes_dir.display().to_string(), e))?;
            let path = entry.path();
            let fname = entry.file_name().to_string_lossy().into_owned();
            if fname.starts_with('.') {
                // A create or delete that a crash interrupted: finish it by removal.
                warn!(path = %path.display(), "removing an interrupted volume create/delete");
                fs::remove_dir_all(&path).map_err(|e| DaemonError::io(path.display().to_string(), e))?;
                continue;
            }
            if !path.is_dir() {
                continue;
            }
            let meta = read_meta(&path, node_id)?;
            if meta.id != fname {
                return Err(DaemonError::DataDir {
                    path: path.join(META_FILE),
                    reason: format!("holds id {} but lives in directory {fname}", meta.id),
                });
            }
            if catalog.read_map().contains_key(&meta.name) {
                return Err(DaemonError::DataDir {
                    path: path.join(META_FILE),
                    reason: format!("a second volume is named \"{}\"", meta.name),
                });
            }
            let local = if meta.replicas.contains(&node_id) {
                Some(catalog.reopen_replica(&meta, &path)?)
            } else {
                None
            };
            info!(volume = %meta.name, id = %meta.id, replica = local.is_some(), "volume loaded");
            let v = Volume::new(meta.clone(), local, node_id, catalog.transport.clone());
            catalog.write_map().insert(meta.name, v);
        }
        statefile::fsync_dir(&volumes_dir)?;
        Ok(catalog)
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Volume>>> {
        self.volumes.read().expect("volume map lock poisoned")
    }
    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Volume>>> {
        self.volumes.write().expect("volume map lock poisoned")
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Every cluster node and its peer address, ascending.
    pub fn nodes(&self) -> Vec<(u64, SocketAddr)> {
        self.nodes.iter().map(|(id, a)| (*id, *a)).collect()
    }

    /// Peer nodes this node has not heard from lately.
    pub fn down_nodes(&self) -> Vec<u64> {
        self.liveness.down_peers()
    }

    pub fn is_node(&self, id: u64) -> bool {
        self.nodes.contains_key(&id)
    }

    pub fn group(&self, group_id: u64) -> Option<GroupHandle> {
        self.groups
            .read()
            .expect("group map lock poisoned")
            .get(&group_id)
            .cloned()
    }

    pub fn all_groups(&self) -> Vec<GroupHandle> {
        self.groups
            .read()
            .expect("group map lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Starts (or restarts from the durable log) this node's replica.
    /// Restarts a replica after a node restart. A replica whose image or
    /// log is gone (a replaced disk, a wiped directory) is rebuilt from its
    /// peers: it starts empty, does not vote until it has caught up (its
    /// vote could otherwise help elect a leader missing entries it had
    /// acknowledged), and gets the volume by snapshot or log replay. A
    /// single-replica volume has no peer to rebuild from, so that refuses
    /// to start instead of serving a volume with acknowledged writes missing.
    fn reopen_replica(&self, meta: &VolumeMeta, dir: &Path) -> Result<LocalReplica> {
        let image = dir.join(IMAGE_FILE);
        let stored = self.log.load(meta.group_id).map_err(|e| DaemonError::DataDir {
            path: dir.to_path_buf(),
            reason: format!("raft log of group {:x}: {e}", meta.group_id),
        })?;
        let applied = read_applied_state(&dir.join(STATE_FILE))?;
        let image_missing = !image.exists();
        let last_logged = stored
            .as_ref()
            .and_then(|g| g.entries.last())
            .map(|e| e.index)
            .unwrap_or(0);
        // volume.state ahead of the log: the image holds more than the log
        // can account for (a crash between them); only the peers can say
        // what the state at that point was.
        // A gap between what the image holds and the log's first entry
        // (entries lost from the front of the log, say a log file cut
        // between two batches) can be refilled only by the peers too,
        // unless that first entry is a snapshot install's point, which
        // stands for everything before it.
        let first_logged = stored.as_ref().and_then(|g| g.entries.first());
        let log_gap = first_logged.is_some_and(|e| {
            e.index > applied.destaged_index.saturating_add(1) && parse_snapshot_point(&e.data).is_none()
        });
        let log_missing = (stored.is_none() && applied.destaged_index > 0)
            || (stored.is_some() && applied.destaged_index > last_logged)
            || log_gap;
        if !image_missing && !log_missing {
            let store = UringStore::open(&self.engine, &image, meta.size_bytes)?;
            return self.start_replica(meta, dir, store, StartMode::Restart);
        }
        let what = if image_missing { "image" } else { "raft log" };
        if meta.replicas.len() < 2 {
            return Err(DaemonError::DataDir {
                path: if image_missing { image } else { dir.to_path_buf() },
                reason: format!(
                    "the {what} of single-replica volume \"{}\" is missing; acknowledged writes would be lost",
                    meta.name
                ),
            });
        }
        warn!(volume = %meta.name, "the replica's {what} is missing: rebuilding it from the other replicas");
        if stored.is_some() {
            self.log.remove_group(meta.group_id).map_err(|e| DaemonError::DataDir {
                path: dir.to_path_buf(),
                reason: format!("discarding the raft log of group {:x}: {e}", meta.group_id),
            })?;
        }
        let _ = fs::remove_file(dir.join(STATE_FILE));
        let _ = fs::remove_file(&image);
        let store = UringStore::create(&self.engine, &image, meta.size_bytes)?;
        self.start_replica(meta, dir, store, StartMode::Rebuild)
    }

    fn start_replica(&self, meta: &VolumeMeta, dir: &Path, store: UringStore, mode: StartMode) -> Result<LocalReplica> {
        let fresh = mode != StartMode::Restart;
        let config = ReplicaConfig::new(self.node_id);
        let raft_err = |e: trireme_replica::ProposeError| DaemonError::DataDir {
            path: dir.to_path_buf(),
            reason: format!("starting the replica: {e}"),
        };
        let applied = read_applied_state(&dir.join(STATE_FILE))?;
        let stored = if fresh {
            None
        } else {
            self.log.load(meta.group_id).map_err(|e| DaemonError::DataDir {
                path: dir.to_path_buf(),
                reason: format!("raft log of group {:x}: {e}", meta.group_id),
            })?
        };
        let mut replica = match stored {
            None => Replica::new(&config, &meta.replicas).map_err(raft_err)?,
            Some(mut g) => {
                let mut applied = applied;
                // A snapshot install's stand-in entry is authoritative for its
                // point when volume.state had not caught up with it yet.
                if let Some(first) = g.entries.first()
                    && first.index > applied.destaged_index
                    && let Some((epoch, attached_node)) = parse_snapshot_point(&first.data)
                {
                    applied = AppliedState {
                        destaged_index: first.index,
                        epoch,
                        attached_node,
                    };
                }
                // Destaged entries were committed, even if the hard state
                // that says so did not reach the disk before a crash.
                if g.entries.last().is_some_and(|e| e.index >= applied.destaged_index) {
                    g.hard_state.commit = g.hard_state.commit.max(applied.destaged_index);
                }
                let cs = if g.conf_state.voters.is_empty() {
                    ConfState::from((meta.replicas.clone(), vec![]))
                } else {
                    g.conf_state
                };
                let state = VolumeState {
                    epoch: applied.epoch,
                    attached_node: applied.attached_node,
                    applied_index: applied.destaged_index,
                    ..VolumeState::default()
                };
                Replica::restart(&config, g.hard_state, cs, &g.entries, state).map_err(raft_err)?
            }
        };
        // A new group's first replica campaigns at once instead of waiting
        // out an election timeout; the others join its election.
        if mode == StartMode::Create && meta.replicas.first() == Some(&self.node_id) {
            let _ = replica.campaign();
        }
        let store = Arc::new(store);
        let handle = group::spawn(group::GroupSetup {
            group_id: meta.group_id,
            volume: meta.name.clone(),
            replica,
            destaged_index: applied.destaged_index,
            store: store.clone(),
            state_path: dir.join(STATE_FILE),
            transport: self.transport.clone(),
            log: self.log_writer.clone(),
            recovering: mode == StartMode::Rebuild,
            liveness: self.liveness.clone(),
            replica_count: u64::from(meta.replica_count),
            receipt_mode: meta.durability == Durability::QuorumReceipt,
            checkpoints: self.checkpoints,
        });
        self.groups
            .write()
            .expect("group map lock poisoned")
            .insert(meta.group_id, handle.clone());
        Ok(LocalReplica {
            store,
            group: handle,
            dir: dir.to_path_buf(),
        })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Volume>> {
        self.read_map()
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::VolumeNotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.read_map().values().cloned().collect()
    }

    /// Picks the replica nodes: `count` distinct nodes, starting at a
    /// position derived from the name so volumes spread over the cluster.
    fn place(&self, name: &str, count: u32) -> Vec<u64> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let start = name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))) as usize;
        (0..count as usize).map(|i| ids[(start + i) % ids.len()]).collect()
    }

    /// Pushes a change to every other node; `required` nodes must take it.
    async fn broadcast(&self, change: &CatalogChange, required: &[u64]) -> Result<()> {
        let mut failed = Vec::new();
        for &node in self.nodes.keys() {
            if node == self.node_id {
                continue;
            }
            if let Err(e) = self.transport.catalog(node, change.clone()).await {
                warn!(node, volume = %change.name, "catalog change not delivered: {e}");
                if required.contains(&node) {
                    failed.push(format!("node {node}: {e}"));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::FailedPrecondition(format!(
                "replica nodes did not take the change to volume \"{}\": {}",
                change.name,
                failed.join("; ")
            )))
        }
    }

    pub async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        replica_count: u32,
        durability: &str,
    ) -> Result<Arc<Volume>> {
        validate_name(name)?;
        validate_size("size_bytes", size_bytes)?;
        let durability = durability_arg("durability", durability)?;
        let nodes = self.nodes.len() as u32;
        let replica_count = if replica_count == 0 {
            nodes.min(3)
        } else {
            replica_count
        };
        if ![1, 3, 5].contains(&replica_count) {
            return Err(DaemonError::InvalidArgument(format!(
                "replica_count {replica_count} must be 1, 3 or 5"
            )));
        }
        if replica_count > nodes {
            return Err(DaemonError::FailedPrecondition(format!(
                "replica_count {replica_count} needs {replica_count} nodes but the cluster has {nodes}"
            )));
        }
        let _guard = self.admin_lock.lock().await;
        if self.read_map().contains_key(name) {
            return Err(DaemonError::VolumeExists(name.to_string()));
        }
        let (id, group_id) = new_volume_id()?;
        let meta = VolumeMeta {
            id,
            name: name.to_string(),
            size_bytes,
            replica_count,
            created_at_unix_s: now_unix_s(),
            group_id,
            replicas: self.place(name, replica_count),
            durability,
        };
        let change = change_of(&meta, false);
        // Peers first: if a replica node refuses, nothing was created here.
        if let Err(e) = self.broadcast(&change, &meta.replicas).await {
            let _ = self.broadcast(&change_of(&meta, true), &[]).await;
            return Err(e);
        }
        self.apply_locally(&change).await?;
        info!(volume = %name, id = %meta.id, size_bytes, replicas = ?meta.replicas, "volume created");
        self.get(name)
    }

    /// Applies a catalog change pushed by a peer (or by this node).
    pub async fn apply_change(&self, change: CatalogChange) -> Result<()> {
        let _guard = self.admin_lock.lock().await;
        self.apply_locally(&change).await
    }

    async fn apply_locally(&self, change: &CatalogChange) -> Result<()> {
        validate_name(&change.name)?;
        validate_size("size_bytes", change.size_bytes)?;
        if change.delete {
            return self.remove_locally(&change.name, &change.id).await;
        }
        let existing = self.read_map().get(&change.name).cloned();
        if let Some(v) = existing {
            let mut meta = v.meta();
            if meta.id != change.id {
                return Err(DaemonError::VolumeExists(change.name.clone()));
            }
            // Same volume again: a resize, or a repeated create.
            if change.size_bytes > meta.size_bytes {
                if let Some(local) = &v.local {
                    local.store.grow(change.size_bytes).await?;
                }
                meta.size_bytes = change.size_bytes;
                write_meta(&self.volumes_dir.join(&meta.id), &meta)?;
                v.set_meta(meta);
            }
            return Ok(());
        }
        let meta = VolumeMeta {
            id: change.id.clone(),
            name: change.name.clone(),
            size_bytes: change.size_bytes,
            replica_count: change.replicas.len() as u32,
            created_at_unix_s: change.created_at_unix_s,
            group_id: change.group_id,
            replicas: change.replicas.clone(),
            durability: durability_arg(
                &format!("catalog change for {}: durability", change.name),
                &change.durability,
            )?,
        };
        let staging = self.volumes_dir.join(format!(".creating-{}", meta.id));
        let final_dir = self.volumes_dir.join(&meta.id);
        let io_err = |p: &Path, e| DaemonError::io(p.display().to_string(), e);
        fs::create_dir(&staging).map_err(|e| io_err(&staging, e))?;
        let local_replica = meta.replicas.contains(&self.node_id);
        let built = (|| -> Result<Option<UringStore>> {
            let store = if local_replica {
                Some(UringStore::create(
                    &self.engine,
                    &staging.join(IMAGE_FILE),
                    meta.size_bytes,
                )?)
            } else {
                None
            };
            write_meta(&staging, &meta)?;
            statefile::fsync_dir(&staging)?;
            fs::rename(&staging, &final_dir).map_err(|e| io_err(&final_dir, e))?;
            statefile::fsync_dir(&self.volumes_dir)?;
            Ok(store)
        })();
        let store = match built {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let local = match store {
            Some(staged) => {
                // Reopen under the final path: the staged handle still names
                // the hidden directory it was created in.
                drop(staged);
                let store = UringStore::open(&self.engine, &final_dir.join(IMAGE_FILE), meta.size_bytes)?;
                Some(self.start_replica(&meta, &final_dir, store, StartMode::Create)?)
            }
            None => None,
        };
        let v = Volume::new(meta.clone(), local, self.node_id, self.transport.clone());
        self.write_map().insert(meta.name.clone(), v);
        Ok(())
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let v = self.get(name)?;
        let open = v.open_sessions();
        if open > 0 && !force {
            return Err(DaemonError::FailedPrecondition(format!(
                "volume \"{name}\" has {open} open NBD session(s); disconnect them or delete with --force"
            )));
        }
        let meta = v.meta();
        let change = change_of(&meta, true);
        self.broadcast(&change, &[]).await?;
        let _guard = self.admin_lock.lock().await;
        self.remove_locally(name, &meta.id).await
    }

    async fn remove_locally(&self, name: &str, id: &str) -> Result<()> {
        let volume = {
            let mut map = self.write_map();
            match map.get(name) {
                Some(v) if v.meta().id == id => {}
                // Already gone (a repeated delete): nothing to do.
                _ => return Ok(()),
            }
            map.remove(name)
        };
        let Some(volume) = volume else { return Ok(()) };
        if volume.open_sessions() > 0 {
            volume.revoke_sessions();
            let deadline = Instant::now() + REVOKE_WAIT;
            while volume.open_sessions() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let meta = volume.meta();
        if let Some(local) = &volume.local {
            let _ = local.group.send(GroupEvent::Stop).await;
            self.groups
                .write()
                .expect("group map lock poisoned")
                .remove(&meta.group_id);
            let log = self.log.clone();
            let group_id = meta.group_id;
            tokio::task::spawn_blocking(move || log.remove_group(group_id))
                .await
                .map_err(|e| DaemonError::io("removing the raft log group", std::io::Error::other(e)))?
                .map_err(|e| DaemonError::io("removing the raft log group", std::io::Error::other(e)))?;
        }
        let dir = self.volumes_dir.join(&meta.id);
        let doomed = self.volumes_dir.join(format!(".deleting-{}", meta.id));
        fs::rename(&dir, &doomed).map_err(|e| DaemonError::io(dir.display().to_string(), e))?;
        statefile::fsync_dir(&self.volumes_dir)?;
        fs::remove_dir_all(&doomed).map_err(|e| DaemonError::io(doomed.display().to_string(), e))?;
        info!(volume = %name, id = %meta.id, "volume deleted");
        Ok(())
    }

    pub async fn resize(&self, name: &str, new_size_bytes: u64) -> Result<Arc<Volume>> {
        validate_size("new_size_bytes", new_size_bytes)?;
        let volume = self.get(name)?;
        let mut meta = volume.meta();
        if new_size_bytes < meta.size_bytes {
            return Err(DaemonError::InvalidArgument(format!(
                "shrink refused: new size {new_size_bytes} is smaller than the current size {} (shrinking destroys data)",
                meta.size_bytes
            )));
        }
        if new_size_bytes == meta.size_bytes {
            return Ok(volume);
        }
        meta.size_bytes = new_size_bytes;
        let change = change_of(&meta, false);
        self.broadcast(&change, &meta.replicas).await?;
        self.apply_change(change).await?;
        info!(volume = %name, new_size_bytes, "volume grown; new sessions see the new size");
        Ok(volume)
    }

    /// Stops every local replica's driver after a last checkpoint each (so
    /// a restart has no log to replay); used at shutdown, after the NBD
    /// sessions have finished. Waits for them all, a bounded time.
    pub async fn stop_all(&self) {
        let mut stopped = Vec::new();
        for g in self.all_groups() {
            let (done, rx) = tokio::sync::oneshot::channel();
            if g.send(GroupEvent::Shutdown(done)).await.is_ok() {
                stopped.push(rx);
            }
        }
        // They checkpoint at once, each on its own task; this only waits.
        let all = async {
            for rx in stopped {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(group::SHUTDOWN_CHECKPOINT + Duration::from_secs(5), all)
            .await
            .is_err()
        {
            warn!("some replicas did not stop in time; a restart replays their logs");
        }
    }
}

fn export_info(v: &Volume) -> ExportInfo {
    let m = v.meta();
    ExportInfo {
        description: format!("trireme volume {} ({} bytes, id {})", m.name, m.size_bytes, m.id),
        name: m.name,
        size_bytes: v.size_bytes(),
    }
}

impl ExportRegistry for Catalog {
    type Device = VolumeSession;

    fn list(&self) -> Vec<ExportInfo> {
        self.read_map().values().map(|v| export_info(v)).collect()
    }

    fn describe(&self, name: &str) -> Option<ExportInfo> {
        self.read_map().get(name).map(|v| export_info(v))
    }

    fn open(&self, name: &str) -> std::result::Result<OpenedExport<Self::Device>, String> {
        let map = self.read_map();
        let v = map.get(name).ok_or_else(|| format!("export \"{name}\" not found"))?;
        let (session, revoked) = v.open_session();
        Ok(OpenedExport {
            info: export_info(v),
            device: Arc::new(session),
            revoked,
        })
    }
}
