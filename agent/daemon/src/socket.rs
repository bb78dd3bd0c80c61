//! The agent's sockets as managed resources: the parent directory is created, a lock file
//! proves that no other agent serves the same path, stale socket files are replaced, and
//! every file the agent makes here gets an exact mode, whatever the process's umask:
//!
//! - a socket directory the agent creates (and any missing parent): [`DIR_MODE`], `0750`
//!   (group members can reach the sockets, and cannot add, remove or replace files there);
//!   an existing directory is left as it is;
//! - the lock file `<socket>.lock`: [`LOCK_MODE`], `0600`;
//! - the gRPC socket and the attach socket `<socket>.attach`: [`SOCKET_MODE`], `0660`, from
//!   the moment they appear at their path (see [`bind`]), so pods in the socket's group can
//!   connect.
//!
//! [`prepare_dir`] readies a socket directory for an agent that runs as an unprivileged user:
//! Kubernetes creates a hostPath directory owned by root, so an init container (root, with
//! only `CAP_CHOWN`) hands it to the agent's user and group first.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rustix::fs::{FlockOperation, Mode, OFlags};

/// Mode of a socket directory the agent creates, and of any missing parent it creates with
/// it (plus the set-group-ID bit where the new directory inherits it from its parent).
pub const DIR_MODE: u32 = 0o750;
/// Mode of the lock file.
pub const LOCK_MODE: u32 = 0o600;
/// Mode of the gRPC and attach sockets.
pub const SOCKET_MODE: u32 = 0o660;

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
    /// Prepares `socket`: creates its directory and any missing parent ([`DIR_MODE`]; an
    /// existing directory keeps its mode), takes the lock (the file is [`LOCK_MODE`]), and
    /// removes stale socket files left by an agent that died.
    ///
    /// # Errors
    /// [`SocketError::InUse`] when a live agent holds the lock; filesystem errors otherwise.
    pub fn claim(socket: &Path) -> Result<Self, SocketError> {
        let dir = socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        create_dirs(dir)?;
        let name = socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = open_lock(&lock_path)?;
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

    /// Removes the sockets and the lock file (at shutdown).
    pub fn remove(&self) {
        for p in [&self.grpc, &self.attach, &self.lock_path] {
            if let Err(e) = fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove");
            }
        }
    }
}

/// Creates the missing directories of `dir`, outermost first, each with exactly
/// [`DIR_MODE`]: `mkdir` applies the umask, so the mode is set again on the new directory.
/// A directory that exists, or that another process creates meanwhile, is left alone.
fn create_dirs(dir: &Path) -> Result<(), SocketError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur.filter(|p| !p.as_os_str().is_empty()) {
        match fs::metadata(p) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(p),
            Err(e) => return Err(io("inspecting", p)(e)),
        }
        cur = p.parent();
    }
    for p in missing.into_iter().rev() {
        match DirBuilder::new().mode(DIR_MODE).create(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("creating socket directory", p)(e)),
        }
        // Through a descriptor opened without following links, so that a link swapped in
        // for the new directory is refused rather than followed.
        let set = || -> std::io::Result<()> {
            let d = rustix::fs::open(
                p,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let inherited_setgid = rustix::fs::fstat(&d)?.st_mode & 0o2000;
            rustix::fs::fchmod(&d, Mode::from_raw_mode(DIR_MODE | inherited_setgid))?;
            Ok(())
        };
        set().map_err(io("setting permissions on", p))?;
    }
    Ok(())
}

/// Opens (creating if needed) the lock file and sets [`LOCK_MODE`] on it when this process
/// owns it: the mode passed to `open` is masked by the umask, and a lock file left by an
/// earlier agent may have been created with another mode. A link at the path is refused.
fn open_lock(path: &Path) -> Result<File, SocketError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(LOCK_MODE)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(io("opening lock file", path))?;
    let set = || -> std::io::Result<()> {
        let st = rustix::fs::fstat(&lock)?;
        if st.st_uid == rustix::process::geteuid().as_raw() && st.st_mode & 0o7777 != LOCK_MODE {
            rustix::fs::fchmod(&lock, Mode::from_raw_mode(LOCK_MODE))?;
        }
        Ok(())
    };
    set().map_err(io("setting permissions on", path))?;
    Ok(lock)
}

/// Binds a listening socket at `path` (whose stale file [`SocketPaths::claim`] removed) with
/// mode [`SOCKET_MODE`] from the moment it appears there. `bind` creates the socket file
/// with a mode masked by the umask, which is process-wide (and the agent is multithreaded),
/// so the socket is bound under its own name in a new private directory (`0700` at most)
/// beside `path`, given its mode there, and renamed into place; the directory is removed.
/// The listener's own address (`getsockname`, `ss -xl`) is the temporary path.
///
/// # Errors
/// When a step fails; whether a path is too long for a socket address (108 bytes) counts
/// the 13 bytes the temporary directory adds.
pub fn bind_std(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path has no file name",
        )
    })?;
    let private = tempfile::Builder::new()
        .prefix(".nc-bind-")
        .rand_bytes(3)
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)?;
    let tmp = private.path().join(name);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(SOCKET_MODE))?;
    fs::rename(&tmp, path)?;
    private.close()?;
    Ok(listener)
}

/// [`bind_std`], as a Tokio listener (call within a runtime).
///
/// # Errors
/// As [`bind_std`].
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let l = bind_std(path)?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
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
    use std::os::unix::{
        fs::{FileTypeExt, MetadataExt},
        process::CommandExt,
    };

    use super::*;

    const UMASK_CHILD: &str = "NENCACHE_TEST_UMASK_CHILD_SOCKET";

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// Claims and binds the socket named in the environment, in a process started by
    /// `modes_do_not_depend_on_the_umask` under the umask it chose; does nothing otherwise.
    #[test]
    fn umask_child() {
        let Some(sock) = std::env::var_os(UMASK_CHILD) else {
            return;
        };
        let paths = SocketPaths::claim(Path::new(&sock)).unwrap();
        let _grpc = bind_std(&paths.grpc).unwrap();
        let _attach = bind_std(&paths.attach).unwrap();
        println!("umask child bound both sockets");
    }

    #[test]
    fn modes_do_not_depend_on_the_umask() {
        for umask in [0o077, 0o000] {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("run/nencache/agent.sock");
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args(["--exact", "socket::tests::umask_child", "--nocapture"])
                .env(UMASK_CHILD, &sock);
            // SAFETY: umask is async-signal-safe and touches nothing of the parent's.
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::umask(Mode::from_raw_mode(umask));
                    Ok(())
                });
            }
            let out = cmd.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("umask child bound both sockets"),
                "umask {umask:03o}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let run = dir.path().join("run");
            for d in [run.clone(), run.join("nencache")] {
                assert_eq!(mode(&d), DIR_MODE, "umask {umask:03o}: {}", d.display());
            }
            let lock = run.join("nencache/agent.sock.lock");
            assert_eq!(mode(&lock), LOCK_MODE, "umask {umask:03o}: lock file");
            for name in ["agent.sock", "agent.sock.attach"] {
                let p = run.join("nencache").join(name);
                let m = fs::symlink_metadata(&p).unwrap();
                assert!(m.file_type().is_socket(), "{}", p.display());
                assert_eq!(m.mode() & 0o7777, SOCKET_MODE, "umask {umask:03o}: {name}");
            }
            let left: Vec<_> = fs::read_dir(run.join("nencache"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left.len(), 3, "only the sockets and the lock: {left:?}");
        }
    }

    #[test]
    fn an_existing_directory_keeps_its_mode_and_a_new_one_keeps_an_inherited_setgid_bit() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("existing");
        fs::create_dir(&existing).unwrap();
        fs::set_permissions(&existing, fs::Permissions::from_mode(0o2711)).unwrap();
        // A lock file left with a wider mode is narrowed.
        let lock = existing.join("agent.sock.lock");
        fs::write(&lock, b"").unwrap();
        fs::set_permissions(&lock, fs::Permissions::from_mode(0o644)).unwrap();
        let a = SocketPaths::claim(&existing.join("agent.sock")).unwrap();
        assert_eq!(
            mode(&existing),
            0o2711,
            "an existing directory is left alone"
        );
        assert_eq!(mode(&lock), LOCK_MODE);
        drop(a);
        // A directory created in a set-group-ID directory inherits the bit (and the group).
        let b = SocketPaths::claim(&existing.join("sub/agent.sock")).unwrap();
        assert_eq!(mode(&existing.join("sub")), 0o2000 | DIR_MODE);
        b.remove();
    }

    #[test]
    fn a_link_in_place_of_the_lock_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"keep").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("agent.sock.lock")).unwrap();
        let err = SocketPaths::claim(&dir.path().join("agent.sock")).unwrap_err();
        assert!(err.to_string().contains("lock file"), "{err}");
        assert_eq!(mode(&target), 0o644);
    }

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
