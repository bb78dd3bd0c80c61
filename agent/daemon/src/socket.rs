//! The agent's sockets as managed resources: the parent directory is created, a lock file
//! proves that no other agent serves the same path, stale socket files are replaced, and
//! permissions are set to 0660 so that pods in the socket's group can connect.
//!
//! [`prepare_dir`] readies a socket directory for an agent that runs as an unprivileged user:
//! Kubernetes creates a hostPath directory owned by root, so an init container (root, with
//! only `CAP_CHOWN`) hands it to the agent's user and group first.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rustix::fs::FlockOperation;

/// A socket-path problem.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another live agent holds the lock on this socket path.
    #[error(
        "another nencache agent is already serving {socket} (it holds {lock}); stop it or choose \
         another --socket"
    )]
    InUse {
        /// The socket path.
        socket: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A filesystem call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io { what, path, source }
}

/// The paths an agent serving `socket` uses, and the lock that makes them its own.
#[derive(Debug)]
pub struct SocketPaths {
    /// gRPC socket.
    pub grpc: PathBuf,
    /// Attach socket (sessions and descriptors).
    pub attach: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

/// File name of the attach socket beside a gRPC socket named `grpc_name`.
#[must_use]
pub fn attach_name(grpc_name: &str) -> String {
    format!("{grpc_name}.attach")
}

impl SocketPaths {
    /// Prepares `socket`: creates its directory (mode 0770), takes the lock, and removes
    /// stale socket files left by an agent that died.
    ///
    /// # Errors
    /// [`SocketError::InUse`] when a live agent holds the lock; filesystem errors otherwise.
    pub fn claim(socket: &Path) -> Result<Self, SocketError> {
        let dir = socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o770)
                .create(dir)
                .map_err(io("creating socket directory", dir))?;
        }
        let name = socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("opening lock file", &lock_path))?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(SocketError::InUse {
                socket: socket.to_path_buf(),
                lock: lock_path,
            });
        }
        let attach = dir.join(attach_name(&name));
        for p in [socket, attach.as_path()] {
            match fs::remove_file(p) {
                Ok(()) => tracing::info!(path = %p.display(), "removed stale socket"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing stale socket", p)(e)),
            }
        }
        Ok(Self {
            grpc: socket.to_path_buf(),
            attach,
            lock_path,
            _lock: lock,
        })
    }

    /// Sets 0660 on both sockets once bound.
    ///
    /// # Errors
    /// When `chmod` fails.
    pub fn set_permissions(&self) -> Result<(), SocketError> {
        for p in [&self.grpc, &self.attach] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o660))
                .map_err(io("setting permissions on", p))?;
        }
        Ok(())
    }

    /// Removes the sockets and the lock file (at shutdown).
    pub fn remove(&self) {
        for p in [&self.grpc, &self.attach, &self.lock_path] {
            if let Err(e) = fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove");
            }
        }
    }
}

/// Creates `dir` (and its parents) if needed, makes it owned by `uid:gid` and sets `mode`.
/// An existing non-directory at `dir` is an error, not replaced.
///
/// # Errors
/// When a filesystem call fails (for instance `chown` without `CAP_CHOWN`).
pub fn prepare_dir(dir: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), SocketError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io("creating directory", dir))?;
    let meta = fs::symlink_metadata(dir).map_err(io("inspecting", dir))?;
    if !meta.is_dir() {
        return Err(SocketError::Io {
            what: "preparing",
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io("changing owner of", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(io("setting permissions on", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_prepared_directory_has_the_owner_and_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("run/nencache");
        let (uid, gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        prepare_dir(&target, uid, gid, 0o750).unwrap();
        let m = fs::metadata(&target).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o750));
        // Idempotent, and a mode change on an existing directory takes.
        prepare_dir(&target, uid, gid, 0o770).unwrap();
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o770);
        // A file in the way is refused, and left alone.
        let file = dir.path().join("file");
        fs::write(&file, b"keep").unwrap();
        let err = prepare_dir(&file, uid, gid, 0o750).unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
        assert_eq!(fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn second_claim_is_refused_and_stale_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/agent.sock");
        let a = SocketPaths::claim(&sock).unwrap();
        let err = SocketPaths::claim(&sock).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        drop(a);
        fs::write(&sock, b"stale").unwrap();
        let b = SocketPaths::claim(&sock).unwrap();
        assert!(!sock.exists(), "the stale file is gone");
        b.remove();
    }
}
