//! The snapshot file: one file, replaced atomically (write a temporary file, fsync it, rename it over
//! the old one, fsync the directory), verified by length and CRC-32 on load.
//!
//! Layout: `MAGIC` (8 bytes), body length (u64, big-endian), CRC-32 of the body (u32, big-endian), the
//! body (the MessagePack encoding of the [`Snapshot`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use crate::error::Cause;
use crate::raft::Snapshot;
use crate::store::StorageError;

const MAGIC: &[u8; 8] = b"HMKSNAP1";
const HEADER_BYTES: usize = 8 + 8 + 4;
/// The largest snapshot file accepted on load (a corrupt length must not make us allocate without
/// bound). Snapshots are bounded by the state machines' own limits, far below this.
pub(super) const MAX_SNAPSHOT_FILE_BYTES: u64 = 4 << 30;

pub(super) const FILE_NAME: &str = "snapshot";
const TEMP_NAME: &str = "snapshot.tmp";

/// Writes `snapshot` as the directory's snapshot, durably, replacing the previous one atomically.
pub(super) fn write(dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let body = rmp_serde::to_vec(snapshot).map_err(|e| io_error(dir, "encode snapshot", e))?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(body.len() as u64).to_be_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    bytes.extend_from_slice(&body);
    let temp = dir.join(TEMP_NAME);
    let write_temp = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    write_temp().map_err(|e| io_error(dir, "write snapshot", e))?;
    fs::rename(&temp, dir.join(FILE_NAME)).map_err(|e| io_error(dir, "rename snapshot", e))?;
    sync_dir(dir).map_err(|e| io_error(dir, "sync directory after snapshot", e))
}

/// Reads the directory's snapshot, `None` when there is none.
pub(super) fn read(dir: &Path) -> Result<Option<Snapshot>, StorageError> {
    let path = dir.join(FILE_NAME);
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(dir, "open snapshot", e)),
    };
    let corrupt = |detail: String| StorageError::Corrupt {
        dir: dir.to_path_buf(),
        detail: format!("snapshot file {}: {detail}", path.display()),
        source: None,
    };
    let mut header = [0u8; HEADER_BYTES];
    if let Err(e) = f.read_exact(&mut header) {
        return Err(corrupt(format!("header unreadable ({e})")));
    }
    if &header[..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let len = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    let on_disk = f
        .metadata()
        .map_err(|e| io_error(dir, "stat snapshot", e))?
        .len();
    if len > MAX_SNAPSHOT_FILE_BYTES || on_disk != HEADER_BYTES as u64 + len {
        return Err(corrupt(format!(
            "length {len} does not match the file's {on_disk} bytes"
        )));
    }
    let mut body = Vec::with_capacity(len as usize);
    f.read_to_end(&mut body)
        .map_err(|e| io_error(dir, "read snapshot", e))?;
    if crc32fast::hash(&body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    rmp_serde::from_slice(&body)
        .map(Some)
        .map_err(|e| corrupt(format!("does not decode ({e})")))
}

/// Removes a temporary file a crash left behind (it never replaced the snapshot).
pub(super) fn remove_leftover(dir: &Path) -> Result<(), StorageError> {
    match fs::remove_file(dir.join(TEMP_NAME)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(dir, "remove leftover snapshot.tmp", e)),
    }
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) fn io_error(
    dir: &Path,
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StorageError {
    StorageError::Io {
        context: format!("{what} in {}", dir.display()),
        source: Some(Cause::new(e)),
    }
}
