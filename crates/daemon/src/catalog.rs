//! The node's volume catalog: DATA_DIR/volumes/ID/{volume.meta,image}.
//!
//! Creation builds the volume in a hidden directory and renames it into
//! place, deletion renames it away before removing it, so a crash at any
//! point leaves a volume either whole or absent; hidden leftovers are
//! cleaned at start. Also the NBD export registry over those volumes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};
use trireme_nbd::{ExportInfo, ExportRegistry, OpenedExport};
use trireme_storage::uring::{IoEngine, UringStore};
use trireme_storage::{BlockStore, statefile};

use crate::error::{DaemonError, Result};
use crate::volume::{Volume, VolumeMeta, VolumeSession};

const META_MAGIC: &[u8; 8] = b"TRIVOLM\0";
const META_VERSION: u32 = 1;
const META_FILE: &str = "volume.meta";
const IMAGE_FILE: &str = "image";
/// Sizes are whole 4 KiB blocks, so every client can address the last byte.
pub const VOLUME_BLOCK_BYTES: u64 = 4096;
/// ext4's largest file with 4 KiB blocks.
pub const MAX_VOLUME_BYTES: u64 = 16 * 1024 * 1024 * 1024 * 1024 - VOLUME_BLOCK_BYTES;
const MAX_NAME_CHARS: usize = 64;
/// How long a forced delete waits for revoked sessions to close.
const REVOKE_WAIT: Duration = Duration::from_secs(10);

pub type LocalVolume = Volume<UringStore>;

pub struct Catalog {
    volumes_dir: PathBuf,
    engine: IoEngine,
    /// Replicas this node can place: 1 until the cluster has more nodes.
    nodes_in_cluster: u32,
    volumes: RwLock<BTreeMap<String, Arc<LocalVolume>>>,
    /// Serialises create/delete/resize so their on-disk steps never interleave.
    admin_lock: tokio::sync::Mutex<()>,
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

fn new_volume_id() -> Result<String> {
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| DaemonError::io("reading /dev/urandom for a volume id", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
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

fn read_meta(dir: &Path) -> Result<VolumeMeta> {
    let path = dir.join(META_FILE);
    let (version, body) = statefile::read(&path, META_MAGIC)?;
    if version != META_VERSION {
        return Err(DaemonError::DataDir {
            path,
            reason: format!("unsupported volume.meta version {version}"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| DaemonError::DataDir {
        path: path.clone(),
        reason: format!("volume.meta body: {e}"),
    })
}

impl Catalog {
    /// Opens every volume under `data_dir/volumes`, refusing to start on a
    /// corrupt one (naming the file) rather than serving without it.
    pub fn load(data_dir: &Path, engine: IoEngine) -> Result<Catalog> {
        let volumes_dir = data_dir.join("volumes");
        fs::create_dir_all(&volumes_dir).map_err(|e| DaemonError::io(volumes_dir.display().to_string(), e))?;
        let mut volumes = BTreeMap::new();
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
            let meta = read_meta(&path)?;
            if meta.id != fname {
                return Err(DaemonError::DataDir {
                    path: path.join(META_FILE),
                    reason: format!("holds id {} but lives in directory {fname}", meta.id),
                });
            }
            let store = UringStore::open(&engine, &path.join(IMAGE_FILE), meta.size_bytes)?;
            if volumes.contains_key(&meta.name) {
                return Err(DaemonError::DataDir {
                    path: path.join(META_FILE),
                    reason: format!("a second volume is named \"{}\"", meta.name),
                });
            }
            info!(volume = %meta.name, id = %meta.id, size_bytes = meta.size_bytes, "volume loaded");
            volumes.insert(meta.name.clone(), Volume::new(meta, store));
        }
        statefile::fsync_dir(&volumes_dir)?;
        Ok(Catalog {
            volumes_dir,
            engine,
            nodes_in_cluster: 1,
            volumes: RwLock::new(volumes),
            admin_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LocalVolume>>> {
        self.volumes.read().expect("volume map lock poisoned")
    }
    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<LocalVolume>>> {
        self.volumes.write().expect("volume map lock poisoned")
    }

    pub fn get(&self, name: &str) -> Result<Arc<LocalVolume>> {
        self.read_map()
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::VolumeNotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<LocalVolume>> {
        self.read_map().values().cloned().collect()
    }

    pub async fn create(&self, name: &str, size_bytes: u64, replica_count: u32) -> Result<Arc<LocalVolume>> {
        validate_name(name)?;
        validate_size("size_bytes", size_bytes)?;
        let replica_count = if replica_count == 0 { 1 } else { replica_count };
        if ![1, 3, 5].contains(&replica_count) {
            return Err(DaemonError::InvalidArgument(format!(
                "replica_count {replica_count} must be 1, 3 or 5"
            )));
        }
        if replica_count > self.nodes_in_cluster {
            return Err(DaemonError::FailedPrecondition(format!(
                "replica_count {replica_count} needs {replica_count} nodes but the cluster has {}",
                self.nodes_in_cluster
            )));
        }
        let _guard = self.admin_lock.lock().await;
        if self.read_map().contains_key(name) {
            return Err(DaemonError::VolumeExists(name.to_string()));
        }
        let id = new_volume_id()?;
        let meta = VolumeMeta {
            id: id.clone(),
            name: name.to_string(),
            size_bytes,
            replica_count,
            created_at_unix_s: now_unix_s(),
        };
        let staging = self.volumes_dir.join(format!(".creating-{id}"));
        let final_dir = self.volumes_dir.join(&id);
        let io_err = |p: &Path, e| DaemonError::io(p.display().to_string(), e);
        fs::create_dir(&staging).map_err(|e| io_err(&staging, e))?;
        let built = (|| -> Result<UringStore> {
            let store = UringStore::create(&self.engine, &staging.join(IMAGE_FILE), size_bytes)?;
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
        // The store was opened under the staging path; the open file is the same.
        let volume = Volume::new(meta, store);
        self.write_map().insert(name.to_string(), volume.clone());
        info!(volume = %name, %id, size_bytes, "volume created");
        Ok(volume)
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let _guard = self.admin_lock.lock().await;
        let volume = {
            let mut map = self.write_map();
            let v = map
                .get(name)
                .cloned()
                .ok_or_else(|| DaemonError::VolumeNotFound(name.to_string()))?;
            let open = v.open_sessions();
            if open > 0 && !force {
                return Err(DaemonError::FailedPrecondition(format!(
                    "volume \"{name}\" has {open} open NBD session(s); disconnect them or delete with --force"
                )));
            }
            // Removed under the lock, so no new session can open it.
            map.remove(name);
            v
        };
        if volume.open_sessions() > 0 {
            volume.revoke_sessions();
            let deadline = Instant::now() + REVOKE_WAIT;
            while volume.open_sessions() > 0 {
                if Instant::now() >= deadline {
                    self.write_map().insert(name.to_string(), volume.clone());
                    return Err(DaemonError::FailedPrecondition(format!(
                        "volume \"{name}\": sessions did not close within {REVOKE_WAIT:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let id = volume.meta().id;
        let dir = self.volumes_dir.join(&id);
        let doomed = self.volumes_dir.join(format!(".deleting-{id}"));
        fs::rename(&dir, &doomed).map_err(|e| DaemonError::io(dir.display().to_string(), e))?;
        statefile::fsync_dir(&self.volumes_dir)?;
        fs::remove_dir_all(&doomed).map_err(|e| DaemonError::io(doomed.display().to_string(), e))?;
        info!(volume = %name, %id, "volume deleted");
        Ok(())
    }

    pub async fn resize(&self, name: &str, new_size_bytes: u64) -> Result<Arc<LocalVolume>> {
        validate_size("new_size_bytes", new_size_bytes)?;
        let _guard = self.admin_lock.lock().await;
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
        // Image first, then metadata: a crash in between leaves an image
        // longer than the volume, which opens fine.
        volume.store().grow(new_size_bytes).await?;
        meta.size_bytes = new_size_bytes;
        write_meta(&self.volumes_dir.join(&meta.id), &meta)?;
        volume.set_meta(meta);
        info!(volume = %name, new_size_bytes, "volume grown; new sessions see the new size");
        Ok(volume)
    }

    /// Syncs every volume; used at shutdown.
    pub async fn sync_all(&self) -> Result<()> {
        for v in self.list() {
            if !v.is_failed() {
                v.sync().await?;
            }
        }
        Ok(())
    }
}

fn export_info(v: &LocalVolume) -> ExportInfo {
    let m = v.meta();
    ExportInfo {
        description: format!("trireme volume {} ({} bytes, id {})", m.name, m.size_bytes, m.id),
        name: m.name,
        size_bytes: v.size_bytes(),
    }
}

impl ExportRegistry for Catalog {
    type Device = VolumeSession<UringStore>;

    fn list(&self) -> Vec<ExportInfo> {
        self.read_map().values().map(|v| export_info(v)).collect()
    }

    fn describe(&self, name: &str) -> Option<ExportInfo> {
        self.read_map().get(name).map(|v| export_info(v))
    }

    fn open(&self, name: &str) -> std::result::Result<OpenedExport<Self::Device>, String> {
        let map = self.read_map();
        let v = map.get(name).ok_or_else(|| format!("export \"{name}\" not found"))?;
        if v.is_failed() {
            return Err(format!("volume \"{name}\" is stopped after an I/O error"));
        }
        let (session, revoked) = v.open_session();
        Ok(OpenedExport {
            info: export_info(v),
            device: Arc::new(session),
            revoked,
        })
    }
}
