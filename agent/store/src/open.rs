//! Opening a store: configuration checks, the lock, the superblock (T2) or `store.meta`
//! (T3), and the choice of I/O engine.
//!
//! - A file or directory that holds something not ours is refused, never overwritten: a
//!   non-empty T2 file without the store magic in its first block, a T3 directory with files
//!   other than the store's and no `store.meta`, or a `store.meta` without the magic.
//! - Our magic with another format version is [`StoreError::UnknownFormat`].
//! - A superblock of the other kind (a T3 `store.meta` opened as a T2 file, or a T2 file
//!   named `store.meta` in a directory opened as T3) is [`StoreError::WrongKind`]; the file
//!   is left as it is.
//! - A superblock whose region size or capacity differ from the configuration (or whose
//!   checksum fails) is rewritten with a new store id and the store starts empty; the reason
//!   is reported in [`crate::Recovery::reset`]. Entries of the earlier store carry its id and
//!   are never read again.
//! - The lock is `flock(LOCK_EX | LOCK_NB)` on the T2 file or on `store.meta`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::buf::AlignedBuf;
use crate::device::mmap::{MmapDevice, segment_name};
use crate::device::pread::PreadDevice;
use crate::device::uring::{UringDevice, probe};
use crate::device::{DataFile, Device, try_lock};
use crate::format::{
    DATA_START, FORMAT_VERSION, KIND_DIR, KIND_FILE, SUPERBLOCK_LEN, SuperError, Superblock,
};
use crate::{IoEngineKind, StoreConfig, StoreError};

/// What opening produced.
pub(crate) struct Opened {
    /// The device (engine chosen, not yet wrapped).
    pub dev: Box<dyn Device>,
    /// The store id.
    pub store_id: u64,
    /// A file whose open description holds the lock (T3: `store.meta`; T2: a clone of the
    /// data file's descriptor).
    pub lock: File,
    /// Where the checkpoint lives.
    pub ckpt_path: PathBuf,
    /// Why the store starts empty, if it was reset.
    pub reset: Option<String>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// Checks the configuration; returns the region count.
pub(crate) fn validate(cfg: &StoreConfig) -> Result<u32, StoreError> {
    if !cfg.region_size.is_power_of_two() || cfg.region_size < (1 << 20) {
        return Err(StoreError::Config(format!(
            "region_size must be a power of two of at least 1 MiB, not {}",
            cfg.region_size
        )));
    }
    if cfg.region_size > (1 << 40) {
        return Err(StoreError::Config(format!(
            "region_size {} is larger than 1 TiB",
            cfg.region_size
        )));
    }
    let count = cfg.capacity / cfg.region_size;
    if count < 2 {
        return Err(StoreError::Config(format!(
            "capacity {} holds fewer than two regions of {} bytes",
            cfg.capacity, cfg.region_size
        )));
    }
    if count > u64::from(u32::MAX) {
        return Err(StoreError::Config(format!(
            "capacity {} holds too many regions",
            cfg.capacity
        )));
    }
    if cfg.queue_depth == 0 {
        return Err(StoreError::Config("queue_depth must be at least 1".into()));
    }
    if cfg.path.as_os_str().is_empty() {
        return Err(StoreError::Config("the store path is empty".into()));
    }
    Ok(count as u32)
}

/// A random non-zero store id.
fn new_store_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut id = u64::from_le_bytes(b);
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id = xxhash_rust::xxh3::xxh3_64(
            &[
                t.to_le_bytes().as_slice(),
                &std::process::id().to_le_bytes(),
            ]
            .concat(),
        );
    }
    id.max(1)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why an existing superblock (of the configured kind) cannot be used as it is (a changed
/// layout), or `None`.
fn layout_change(sb: &Superblock, cfg: &StoreConfig, count: u32) -> Option<String> {
    let capacity = u64::from(count) * cfg.region_size;
    if sb.region_size != cfg.region_size {
        return Some(format!(
            "region size changed from {} to {} bytes; the store was started empty",
            sb.region_size, cfg.region_size
        ));
    }
    if sb.capacity != capacity {
        return Some(format!(
            "capacity changed from {} to {} bytes; the store was started empty",
            sb.capacity, capacity
        ));
    }
    None
}

fn not_ours(path: &Path, what: &str) -> StoreError {
    StoreError::Config(format!(
        "{} {what}; refusing to use it (the store never overwrites data that is not its own): \
         remove it or point the tier elsewhere",
        path.display()
    ))
}

/// Decides from the first bytes what to do: `Ok(Some(sb))` use it, `Ok(None)` format (with
/// the reset reason set if it was ours), `Err` refuse.
fn judge(
    first: &[u8],
    path: &Path,
    kind: u32,
    cfg: &StoreConfig,
    count: u32,
    reset: &mut Option<String>,
) -> Result<Option<Superblock>, StoreError> {
    match Superblock::decode(first) {
        // Another kind of store is not a layout change: it is someone else's data.
        Ok(sb) if sb.kind != kind => Err(StoreError::WrongKind {
            path: path.to_path_buf(),
            found: sb.kind,
            configured: kind,
        }),
        Ok(sb) => match layout_change(&sb, cfg, count) {
            None => Ok(Some(sb)),
            Some(why) => {
                *reset = Some(why);
                Ok(None)
            }
        },
        Err(SuperError::Version(found)) => Err(StoreError::UnknownFormat {
            path: cfg.path.clone(),
            found,
            supported: FORMAT_VERSION,
        }),
        Err(SuperError::Corrupt) => {
            *reset = Some(format!(
                "{}: the superblock checksum does not match; the store was started empty",
                path.display()
            ));
            Ok(None)
        }
        Err(SuperError::Foreign) => Err(not_ours(
            path,
            "is not empty and has no NenCache store magic in its first 4096 bytes",
        )),
    }
}

fn superblock(kind: u32, cfg: &StoreConfig, count: u32) -> Superblock {
    Superblock {
        kind,
        region_size: cfg.region_size,
        capacity: u64::from(count) * cfg.region_size,
        store_id: new_store_id(),
        created_unix_ms: now_unix_ms(),
    }
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Opens the store's files and device.
pub(crate) fn open(cfg: &StoreConfig, count: u32) -> Result<Opened, StoreError> {
    if cfg.io_engine == IoEngineKind::Mmap {
        open_dir(cfg, count)
    } else {
        open_file(cfg, count)
    }
}

fn ckpt_path_for_file(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".ckpt");
    PathBuf::from(s)
}

fn open_file(cfg: &StoreConfig, count: u32) -> Result<Opened, StoreError> {
    let path = &cfg.path;
    let mut df = DataFile::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    if !try_lock(&df.file).map_err(io_err(format!("locking {}", path.display())))? {
        return Err(StoreError::Locked { path: path.clone() });
    }
    let len = df
        .len()
        .map_err(io_err(format!("sizing {}", path.display())))?;
    let want = DATA_START + u64::from(count) * cfg.region_size;
    if df.block_device && len < want {
        return Err(StoreError::Config(format!(
            "{} holds {len} bytes; a capacity of {} needs {want}",
            path.display(),
            cfg.capacity
        )));
    }
    let ckpt_path = ckpt_path_for_file(path);
    let mut reset = None;
    let existing = if len == 0 {
        None
    } else {
        let mut buf = AlignedBuf::zeroed(SUPERBLOCK_LEN);
        let n = read_full(&df.file, &mut buf, 0).map_err(io_err(format!(
            "reading the superblock of {}",
            path.display()
        )))?;
        if df.block_device && buf.iter().all(|&b| b == 0) {
            None
        } else {
            judge(&buf[..n], path, KIND_FILE, cfg, count, &mut reset)?
        }
    };
    let store_id = match existing {
        Some(sb) => {
            if !df.block_device && len < want {
                // Truncated while the store was closed: what is gone reads as empty.
                df.file
                    .set_len(want)
                    .map_err(io_err(format!("resizing {}", path.display())))?;
            }
            sb.store_id
        }
        None => {
            let sb = superblock(KIND_FILE, cfg, count);
            remove_if_present(&ckpt_path)?;
            let mut buf = AlignedBuf::zeroed(SUPERBLOCK_LEN);
            buf.copy_from_slice(&sb.encode());
            df.file.write_all_at(&buf, 0).map_err(io_err(format!(
                "writing the superblock of {}",
                path.display()
            )))?;
            if !df.block_device {
                df.file
                    .set_len(want)
                    .map_err(io_err(format!("sizing {}", path.display())))?;
            }
            df.file
                .sync_all()
                .map_err(io_err(format!("syncing {}", path.display())))?;
            sb.store_id
        }
    };
    df.expected_len = want;
    let lock = df
        .file
        .try_clone()
        .map_err(io_err("duplicating a descriptor"))?;
    let direct = df.direct;
    let file = Arc::new(df);
    let dev: Box<dyn Device> = match cfg.io_engine {
        IoEngineKind::IoUring => {
            probe().map_err(io_err("io_uring (configured) is not available"))?;
            Box::new(UringDevice::new(file, cfg.queue_depth))
        }
        IoEngineKind::Pread => Box::new(
            PreadDevice::new(file, cfg.queue_depth).map_err(io_err("starting I/O threads"))?,
        ),
        _ => match probe() {
            Ok(()) => {
                tracing::info!(path = %path.display(), direct, "I/O engine: io_uring");
                Box::new(UringDevice::new(file, cfg.queue_depth))
            }
            Err(e) => {
                tracing::info!(
                    path = %path.display(),
                    error = %e,
                    direct,
                    "io_uring is not available; I/O engine: pread thread pool"
                );
                Box::new(
                    PreadDevice::new(file, cfg.queue_depth)
                        .map_err(io_err("starting I/O threads"))?,
                )
            }
        },
    };
    Ok(Opened {
        dev,
        store_id,
        lock,
        ckpt_path,
        reset,
    })
}

/// Reads up to `buf.len()` bytes at `off`, stopping at the end of the file.
fn read_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether a directory entry is one the store itself creates.
fn ours(name: &str) -> bool {
    name == "store.meta"
        || name.starts_with("index.ckpt")
        || (name.starts_with("seg-") && name.ends_with(".dat"))
}

fn open_dir(cfg: &StoreConfig, count: u32) -> Result<Opened, StoreError> {
    let dir = &cfg.path;
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let meta_path = dir.join("store.meta");
    if !meta_path.exists() {
        let entries =
            std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
        for e in entries {
            let e = e.map_err(io_err(format!("listing {}", dir.display())))?;
            let name = e.file_name();
            if !ours(&name.to_string_lossy()) {
                return Err(not_ours(
                    dir,
                    &format!(
                        "holds {} but no store.meta, so it is not a NenCache store",
                        name.to_string_lossy()
                    ),
                ));
            }
        }
    }
    let meta = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&meta_path)
        .map_err(io_err(format!("opening {}", meta_path.display())))?;
    if !try_lock(&meta).map_err(io_err(format!("locking {}", meta_path.display())))? {
        return Err(StoreError::Locked { path: dir.clone() });
    }
    let len = meta
        .metadata()
        .map_err(io_err(format!("sizing {}", meta_path.display())))?
        .len();
    let ckpt_path = dir.join("index.ckpt");
    let mut reset = None;
    let existing = if len == 0 {
        None
    } else {
        let mut buf = vec![0u8; SUPERBLOCK_LEN];
        let n = read_full(&meta, &mut buf, 0)
            .map_err(io_err(format!("reading {}", meta_path.display())))?;
        judge(&buf[..n], &meta_path, KIND_DIR, cfg, count, &mut reset)?
    };
    let store_id = match existing {
        Some(sb) => sb.store_id,
        None => {
            // Start empty: drop the segments and checkpoint of an earlier layout.
            remove_if_present(&ckpt_path)?;
            let entries =
                std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("seg-") && name.ends_with(".dat") {
                    remove_if_present(&e.path())?;
                }
            }
            let sb = superblock(KIND_DIR, cfg, count);
            meta.write_all_at(&sb.encode(), 0)
                .and_then(|()| meta.set_len(SUPERBLOCK_LEN as u64))
                .and_then(|()| meta.sync_all())
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(io_err(format!("writing {}", meta_path.display())))?;
            sb.store_id
        }
    };
    let dev = MmapDevice::open(dir, &meta, cfg.region_size, count)
        .map_err(io_err(format!("mapping the segments of {}", dir.display())))?;
    // Segments beyond the configured count belong to no region.
    for r in count..count.saturating_add(1024) {
        let p = dir.join(segment_name(r));
        if !p.exists() {
            break;
        }
        remove_if_present(&p)?;
    }
    Ok(Opened {
        dev: Box::new(dev),
        store_id,
        lock: meta,
        ckpt_path,
        reset,
    })
}
