//! `nencache._native`: the Python bindings of [`nencache_client`].
//!
//! The Python package `nencache` (in `python/nencache/`) re-exports what this module defines.
//! Every protocol detail (gRPC, the attach socket, the fast path, the two mappings, leases,
//! reconnection) stays in the Rust client; this crate only converts arguments and results,
//! releases the GIL while a call waits, and maps errors to the package's exceptions.
//!
//! # Layout
//! - `lib` (this file): the module, the process's tokio runtime and [`wait`], which runs a
//!   client call with the GIL released;
//! - `client`: `nencache.Client`;
//! - `value`: `nencache.Value`, a leased view of the arena exporting the buffer protocol;
//! - `convert`: keys, buffers, tokens, errors and dictionaries between Python and Rust.

mod client;
mod convert;
mod value;

use std::{future::Future, path::Path, time::Duration};

use nencache_client::ClientError;
use parking_lot::Mutex;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

/// The runtime of this process, and the process that built it.
///
/// A runtime's worker threads do not survive `fork`: a child process builds its own runtime
/// on first use (the parent's is leaked there, never used again).
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// The tokio runtime every client of this process runs on, built on first use.
fn runtime() -> PyResult<&'static Runtime> {
    let pid = std::process::id();
    let mut rt = RUNTIME.lock();
    match *rt {
        Some((owner, r)) if owner == pid => Ok(r),
        _ => {
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("nencache-io")
                .enable_all()
                .build()
                .map_err(|e| {
                    pyo3::exceptions::PyRuntimeError::new_err(format!(
                        "starting nencache's I/O threads: {e}"
                    ))
                })?;
            let r: &'static Runtime = Box::leak(Box::new(built));
            *rt = Some((pid, r));
            Ok(r)
        }
    }
}

/// How often a waiting call looks for a signal (Ctrl-C) to deliver.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// A limit on how long a call may wait: the client's timeout, and its socket (for the
/// message).
pub(crate) type Deadline<'a> = Option<(Duration, &'a Path)>;

/// Runs a client call to completion with the GIL released, and maps its error. While it
/// waits, pending signals are checked every [`SIGNAL_POLL`] (with the GIL, briefly): when a
/// handler raises (`KeyboardInterrupt`), the call is dropped, which the Rust client makes
/// safe (what it obtained is returned in the background), and the exception propagates. A
/// call still waiting when `deadline` passes is dropped the same way, raising
/// `nencache.Timeout`.
fn wait<T, F>(py: Python<'_>, deadline: Deadline<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = Result<T, ClientError>> + Send,
    T: Send,
{
    let rt = runtime()?;
    let limit = deadline.map(|(d, _)| d);
    let r = py.detach(|| {
        rt.block_on(async {
            let mut fut = std::pin::pin!(fut);
            let expired = async {
                match limit {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let mut expired = std::pin::pin!(expired);
            loop {
                tokio::select! {
                    r = &mut fut => return Ok(Some(r)),
                    () = &mut expired => return Ok(None),
                    () = tokio::time::sleep(SIGNAL_POLL) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    });
    match r {
        Ok(Some(Ok(v))) => Ok(v),
        Ok(Some(Err(e))) => Err(convert::error(py, &e)),
        Ok(None) => {
            let (d, socket) = deadline.map_or((Duration::ZERO, Path::new("")), |d| d);
            Err(convert::error_class(
                "Timeout",
                &format!(
                    "no answer from the agent at {} within the client's timeout of {} s",
                    socket.display(),
                    d.as_secs_f64()
                ),
            ))
        }
        Err(interrupted) => Err(interrupted),
    }
}

/// The compiled half of the `nencache` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<value::Value>()?;
    m.add_function(wrap_pyfunction!(client::chunk_keys, m)?)?;
    m.add_function(wrap_pyfunction!(client::default_socket, m)?)?;
    m.add("MAX_KEY_LEN", nencache_client::MAX_KEY_LEN)?;
    m.add("DEFAULT_CHUNK_SIZE", nencache_client::DEFAULT_CHUNK_SIZE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
