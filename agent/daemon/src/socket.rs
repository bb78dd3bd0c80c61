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

/// Readies `dir` for an agent that runs as `uid:gid`: afterwards it is a directory owned by
/// `uid:gid` with `mode`. This is the `prepare-dir` subcommand, which the DaemonSet's init
/// container runs as root with `CAP_CHOWN` only, so it takes over nothing that is not safe
/// to hand to the agent. It changes `dir` only when `dir` is
///
/// - a directory it creates itself (missing parents are created `0755`, as the kubelet
///   creates them, and left to the caller);
/// - a directory owned by `uid:gid` already (the agent's, from an earlier start): only its
///   mode is set;
/// - an empty directory owned by `root:root` with mode `0755`: what the kubelet's
///   `DirectoryOrCreate` hostPath makes, before anything was put in it.
///
/// Anything else is refused and left as it is: a directory with contents or another owner
/// or mode (`/etc`, a kubelet or runtime directory, another program's state), a symbolic
/// link, or a non-directory. The checks and the changes go through one `O_PATH` descriptor
/// opened without following links, so the directory checked is the directory changed, and
/// root needs no permission on the directory to inspect it (with `CAP_CHOWN` only, root
/// cannot read a `0750` directory it does not own). Root without `CAP_FOWNER` may change
/// the mode only of a directory it owns, so the mode is set before the owner (taking the
/// directory over first, with `CAP_CHOWN`, when root does not own it).
///
/// # Errors
/// A refused directory (the message says why), or a failed filesystem call (for instance
/// `chown` without `CAP_CHOWN`).
pub fn prepare_dir(dir: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), SocketError> {
    use std::os::fd::AsRawFd;

    use rustix::{
        fs::{AtFlags, Mode, OFlags},
        io::Errno,
        process::{Gid, Uid},
    };
    let refuse = |why: String| SocketError::Io {
        what: "refusing to prepare",
        path: dir.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
    };
    let sys = |what: &'static str| move |e: Errno| io(what, dir)(e.into());
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io("creating directory", parent))?;
    }
    // Private until it is handed over.
    let created = match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(sys("creating directory")(e)),
    };
    let fd = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR | Errno::LOOP => refuse("not a directory (a file or a symbolic link)".into()),
        e => sys("opening")(e),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(sys("inspecting"))?;
    let (owner, group, current) = (st.st_uid, st.st_gid, st.st_mode & 0o7777);
    let me = rustix::process::geteuid().as_raw();
    if owner != uid || group != gid {
        let empty = || -> Result<bool, Errno> {
            let listing = rustix::fs::openat(
                &fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            for entry in rustix::fs::Dir::new(listing)? {
                let entry = entry?;
                if ![&b"."[..], b".."].contains(&entry.file_name().to_bytes()) {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let is_empty = empty().map_err(sys("reading"))?;
        let made_here = created && owner == me && is_empty;
        let from_kubelet = owner == 0 && group == 0 && current == 0o755 && is_empty;
        if !made_here && !from_kubelet {
            return Err(refuse(format!(
                "it is owned by {owner}:{group} with mode {current:04o}{}; only a directory \
                 created here, one owned by {uid}:{gid} already, or an empty root:root 0755 one \
                 (as the kubelet creates it) is handed over",
                if is_empty { "" } else { " and not empty" },
            )));
        }
    }
    let chown = |u: u32, g: Option<u32>| {
        rustix::fs::chownat(
            &fd,
            "",
            Some(Uid::from_raw(u)),
            g.map(Gid::from_raw),
            AtFlags::EMPTY_PATH,
        )
        .map_err(sys("changing owner of"))
    };
    if current != mode {
        if owner != me {
            chown(me, None)?;
        }
        // The directory the descriptor holds, whatever happens to the path meanwhile.
        let held = format!("/proc/self/fd/{}", fd.as_raw_fd());
        rustix::fs::chmod(held.as_str(), Mode::from_raw_mode(mode))
            .map_err(sys("setting permissions on"))?;
    }
    chown(uid, Some(gid))?;
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
