//! One volume on this node and the NBD sessions open on it.
//!
//! In this single-node build a write is acknowledged once it is in the image
//! and the image has been fdatasynced (group-committed with every other
//! write waiting at the same time). When replication lands, a replicated
//! volume implements the same `BlockDevice` and acknowledges on quorum
//! commit instead; the NBD layer does not change.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::error;
use trireme_nbd::{BlockDevice, DeviceError, DeviceResult, Errno};
use trireme_storage::{BlockStore, StorageError, ZeroMode};

/// What `volume.meta` holds (a checksummed state file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMeta {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub replica_count: u32,
    pub created_at_unix_s: u64,
}

/// Zero-filled source for writing zeroes where the filesystem can't punch.
static ZEROES: [u8; 1 << 20] = [0u8; 1 << 20];

pub struct Volume<S> {
    meta: std::sync::Mutex<VolumeMeta>,
    size_bytes: AtomicU64,
    store: S,
    open_sessions: AtomicU32,
    revoke: watch::Sender<bool>,
    /// Set after an fdatasync failed: the kernel may have dropped the dirty
    /// pages, so nothing written since the last good sync can be trusted to
    /// be durable. The volume refuses I/O until the node restarts.
    failed: AtomicBool,
}

impl<S: BlockStore> Volume<S> {
    pub fn new(meta: VolumeMeta, store: S) -> Arc<Volume<S>> {
        let (revoke, _) = watch::channel(false);
        Arc::new(Volume {
            size_bytes: AtomicU64::new(meta.size_bytes),
            meta: std::sync::Mutex::new(meta),
            store,
            open_sessions: AtomicU32::new(0),
            revoke,
            failed: AtomicBool::new(false),
        })
    }

    pub fn meta(&self) -> VolumeMeta {
        self.meta.lock().expect("volume meta lock poisoned").clone()
    }

    pub fn set_meta(&self, meta: VolumeMeta) {
        self.size_bytes.store(meta.size_bytes, Ordering::SeqCst);
        *self.meta.lock().expect("volume meta lock poisoned") = meta;
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn open_sessions(&self) -> u32 {
        self.open_sessions.load(Ordering::SeqCst)
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Opens a session; it counts as open until the returned value is dropped.
    pub fn open_session(self: &Arc<Self>) -> (VolumeSession<S>, watch::Receiver<bool>) {
        self.open_sessions.fetch_add(1, Ordering::SeqCst);
        (VolumeSession { volume: self.clone() }, self.revoke.subscribe())
    }

    /// Asks every open session to finish its in-flight requests and close.
    pub fn revoke_sessions(&self) {
        self.revoke.send_replace(true);
    }

    pub async fn sync(&self) -> Result<(), StorageError> {
        self.store.sync().await
    }

    fn check_usable(&self) -> DeviceResult<()> {
        if self.is_failed() {
            let name = self.meta().name;
            return Err(DeviceError::new(
                Errno::Io,
                format!("volume {name} stopped after an fdatasync error; restart the node to recover"),
            ));
        }
        Ok(())
    }

    /// Makes everything written so far durable, or fails the volume.
    async fn commit(&self) -> DeviceResult<()> {
        let r = self.store.sync().await;
        self.checked(r)
    }

    /// Passes a storage result on; a failed fdatasync also fails the volume.
    fn checked(&self, r: Result<(), StorageError>) -> DeviceResult<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e @ StorageError::Sync(_)) => {
                self.failed.store(true, Ordering::SeqCst);
                error!(volume = %self.meta().name, "fdatasync failed, volume stopped: {e}");
                Err(to_device_error(e))
            }
            Err(e) => Err(to_device_error(e)),
        }
    }
}

fn to_device_error(e: StorageError) -> DeviceError {
    let errno = match &e {
        // ENOSPC, EDQUOT and EFBIG all become NBD_ENOSPC (proto.md "Error values").
        StorageError::Io { source, .. } | StorageError::Sync(source) => match source.raw_os_error() {
            Some(28 | 122 | 27) => Errno::NoSpc,
            _ => Errno::Io,
        },
        StorageError::Unsupported(_) => Errno::NotSup,
        _ => Errno::Io,
    };
    DeviceError::new(errno, e.to_string())
}

/// One NBD session's handle on a volume.
pub struct VolumeSession<S: BlockStore> {
    volume: Arc<Volume<S>>,
}

impl<S: BlockStore> Drop for VolumeSession<S> {
    fn drop(&mut self) {
        self.volume.open_sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S: BlockStore> BlockDevice for VolumeSession<S> {
    async fn read(&self, offset: u64, length: u32) -> DeviceResult<Bytes> {
        self.volume.check_usable()?;
        self.volume
            .store
            .read(offset, length as usize)
            .await
            .map_err(to_device_error)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        // Every write is durable before its reply, so FUA needs nothing more.
        self.volume.check_usable()?;
        let r = self.volume.store.write_durable(offset, data).await;
        self.volume.checked(r)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        may_trim: bool,
        fast_only: bool,
        _fua: bool,
    ) -> DeviceResult<()> {
        self.volume.check_usable()?;
        let mode = if may_trim { ZeroMode::Punch } else { ZeroMode::Allocate };
        match self.volume.store.write_zeroes(offset, u64::from(length), mode).await {
            Ok(()) => {}
            Err(StorageError::Unsupported(_)) if fast_only => {
                return Err(DeviceError::new(
                    Errno::NotSup,
                    "zeroing would be no faster than writing",
                ));
            }
            Err(StorageError::Unsupported(_)) => {
                let mut done = 0u64;
                while done < u64::from(length) {
                    let n = (u64::from(length) - done).min(ZEROES.len() as u64) as usize;
                    let chunk = Bytes::from_static(&ZEROES[..n]);
                    self.volume
                        .store
                        .write(offset + done, chunk)
                        .await
                        .map_err(to_device_error)?;
                    done += n as u64;
                }
            }
            Err(e) => return Err(to_device_error(e)),
        }
        self.volume.commit().await
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> DeviceResult<()> {
        self.volume.check_usable()?;
        match self
            .volume
            .store
            .write_zeroes(offset, u64::from(length), ZeroMode::Punch)
            .await
        {
            Ok(()) => self.volume.commit().await,
            // TRIM is advisory: a filesystem that can't punch holes keeps the data.
            Err(StorageError::Unsupported(_)) => Ok(()),
            Err(e) => Err(to_device_error(e)),
        }
    }

    async fn flush(&self) -> DeviceResult<()> {
        // Every acknowledged write was fdatasynced before its reply, on this
        // session or any other, so there is nothing left to flush.
        self.volume.check_usable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trireme_storage::fault::FaultyStore;
    use trireme_storage::mem::{CrashMode, MemStore};

    fn meta() -> VolumeMeta {
        VolumeMeta {
            id: "1".into(),
            name: "v".into(),
            size_bytes: 1 << 20,
            replica_count: 1,
            created_at_unix_s: 0,
        }
    }

    #[tokio::test]
    async fn an_acknowledged_write_survives_a_crash() {
        let v = Volume::new(meta(), MemStore::new());
        let (s, _) = v.open_session();
        s.write(8192, Bytes::from_static(b"acked"), false).await.expect("write");
        v.store().crash(CrashMode::DropUnsynced);
        assert_eq!(&s.read(8192, 5).await.expect("read")[..], b"acked");
        s.write_zeroes(8192, 5, true, false, false).await.expect("zero");
        v.store().crash(CrashMode::DropUnsynced);
        assert_eq!(&s.read(8192, 5).await.expect("read")[..], &[0u8; 5]);
    }

    #[tokio::test]
    async fn a_failed_fdatasync_fails_the_write_and_stops_the_volume() {
        let (store, faults) = FaultyStore::new(MemStore::new());
        faults.failing_syncs.store(1, Ordering::SeqCst);
        let v = Volume::new(meta(), store);
        let (s, _) = v.open_session();
        let e = s
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .expect_err("sync failed");
        assert_eq!(e.errno, Errno::Io);
        // fsyncgate: a later sync may "succeed" with the data gone, so stay failed.
        assert!(s.write(0, Bytes::from_static(b"y"), false).await.is_err());
        assert!(s.flush().await.is_err());
        assert!(v.is_failed());
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_but_leaves_the_volume_usable() {
        // Unlike a failed fdatasync, a failed write (EIO, ENOSPC) breaks no promise already made.
        let (store, faults) = FaultyStore::new(MemStore::new());
        faults.writes_before_failure.store(0, Ordering::SeqCst);
        let v = Volume::new(meta(), store);
        let (s, _) = v.open_session();
        assert_eq!(
            s.write(0, Bytes::from_static(b"x"), false)
                .await
                .expect_err("write fails")
                .errno,
            Errno::Io
        );
        assert!(!v.is_failed());
        faults.writes_before_failure.store(-1, Ordering::SeqCst);
        s.write(0, Bytes::from_static(b"y"), false)
            .await
            .expect("writes work again");
        assert_eq!(&s.read(0, 1).await.expect("read")[..], b"y");
    }

    #[tokio::test]
    async fn sessions_are_counted_and_revocable() {
        let v = Volume::new(meta(), MemStore::new());
        let (a, mut ra) = v.open_session();
        let (b, _) = v.open_session();
        assert_eq!(v.open_sessions(), 2);
        v.revoke_sessions();
        assert!(*ra.borrow_and_update());
        drop((a, b));
        assert_eq!(v.open_sessions(), 0);
    }
}
