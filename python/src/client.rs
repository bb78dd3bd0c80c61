//! `nencache.Client` and the module's functions (`chunk_keys`, `default_socket`).

use std::{path::PathBuf, time::Duration};

use nencache_client::{ChunkKeys, ClientOptions, Put};
use parking_lot::RwLock;
use pyo3::{
    exceptions::PyTypeError,
    prelude::*,
    types::{PyBytes, PyDict, PyTuple},
};

use crate::{
    Deadline,
    convert::{self, Bytes},
    value::Value,
    wait,
};

/// The socket a client uses when none is given: `$NENCACHE_SOCKET`, else the agent's default
/// (`$XDG_RUNTIME_DIR/nencache/agent.sock` when that variable is an absolute path, else
/// `/tmp/nencache-$UID/agent.sock`), as the agent and the `nencache` CLI choose it.
fn resolve_default_socket() -> PathBuf {
    if let Some(s) = std::env::var_os("NENCACHE_SOCKET").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("nencache").join("agent.sock"),
        _ => PathBuf::from(format!(
            "/tmp/nencache-{}/agent.sock",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// A path as Python text.
fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The socket path a `Client()` without arguments connects to: `$NENCACHE_SOCKET`, else
/// `$XDG_RUNTIME_DIR/nencache/agent.sock`, else `/tmp/nencache-$UID/agent.sock`.
#[pyfunction]
pub(crate) fn default_socket() -> String {
    path_str(&resolve_default_socket())
}

/// Content-defined chunk keys of a prompt: one 16-byte key per full chunk of `chunk_size`
/// tokens (and one for a trailing partial chunk when `partial` is true), each chained over
/// everything before it, so prompts that share their first n chunks share their first n keys.
/// `fingerprint` names whatever changes the bytes of a KV chunk (model, dtype, layout,
/// parallelism). `tokens` is a sequence of token ids (0 to 2**32-1) or an integer numpy
/// array. The keys match those of every other NenCache client (see docs/ARCHITECTURE.md).
#[pyfunction]
#[pyo3(signature = (fingerprint, tokens, chunk_size = None, *, partial = false))]
pub(crate) fn chunk_keys<'py>(
    py: Python<'py>,
    fingerprint: &str,
    tokens: &Bound<'py, PyAny>,
    chunk_size: Option<&Bound<'py, PyAny>>,
    partial: bool,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let chunk_size = match chunk_size {
        Some(n) => convert::chunk_size(n)?,
        None => nencache_client::DEFAULT_CHUNK_SIZE,
    };
    let tokens = convert::tokens(tokens)?;
    let fingerprint = fingerprint.to_owned();
    let keys = py.detach(move || {
        let ck = ChunkKeys::new(&fingerprint, chunk_size);
        if partial {
            ck.keys_with_partial(&tokens)
        } else {
            ck.keys(&tokens)
        }
    });
    Ok(keys.iter().map(|k| PyBytes::new(py, k)).collect())
}

/// A connection to the node's NenCache agent.
///
/// `Client(socket=None)` connects to `socket` (a path), else `$NENCACHE_SOCKET`, else the
/// agent's default path (see `default_socket()`), and raises `nencache.ConnectionError`
/// naming the path when no agent answers. One client may be shared by any number of threads:
/// calls release the GIL while they wait, and run concurrently on one session. When the agent
/// restarts, a call under way may raise `nencache.Disconnected`; the next call reconnects.
#[pyclass(frozen, module = "nencache", name = "Client")]
pub(crate) struct Client {
    /// `None` once closed.
    inner: RwLock<Option<nencache_client::Client>>,
    socket: PathBuf,
    /// The longest any call may wait, connecting included.
    timeout: Option<Duration>,
    /// The process that connected: a client does not survive `fork`.
    pid: u32,
}

impl Client {
    /// How long a call may wait.
    fn deadline(&self) -> Deadline<'_> {
        self.timeout.map(|t| (t, self.socket.as_path()))
    }

    /// The Rust client, or why it cannot be used.
    fn client(&self) -> PyResult<nencache_client::Client> {
        if std::process::id() != self.pid {
            return Err(crate::convert::error_class(
                "Error",
                &format!(
                    "this nencache.Client was created in process {} and cannot be used after \
                     fork; create a new Client in this process",
                    self.pid
                ),
            ));
        }
        self.inner.read().clone().ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err("this nencache.Client is closed")
        })
    }
}

/// The items of a put, converted: per item its key, its value's bytes (in place) and its
/// metadata.
#[derive(Default)]
struct Items {
    keys: Vec<Vec<u8>>,
    values: Vec<Bytes>,
    metas: Vec<Vec<u8>>,
}

/// The items of a `put_many`: a mapping of key to value, or an iterable of `(key, value)` or
/// `(key, value, metadata)` tuples.
fn put_items(items: &Bound<'_, PyAny>, default_meta: &[u8]) -> PyResult<Items> {
    let iter = if let Ok(d) = items.cast::<PyDict>() {
        d.items().into_any().try_iter()?
    } else if items.hasattr("keys")? && items.hasattr("items")? {
        items.call_method0("items")?.try_iter()?
    } else {
        items.try_iter().map_err(|_| {
            PyTypeError::new_err(
                "put_many takes a mapping of key to value, or an iterable of (key, value) or \
                 (key, value, metadata) tuples",
            )
        })?
    };
    let mut out = Items::default();
    for item in iter {
        let item = item?;
        let t = item
            .cast::<PyTuple>()
            .ok()
            .filter(|t| matches!(t.len(), 2 | 3))
            .ok_or_else(|| {
                PyTypeError::new_err(
                    "each put_many item must be a (key, value) or (key, value, metadata) tuple",
                )
            })?;
        let key = convert::key(&t.get_item(0)?)?;
        let value = convert::value(&t.get_item(1)?, &key)?;
        let meta = if t.len() == 3 {
            convert::metadata(Some(&t.get_item(2)?))?
        } else {
            default_meta.to_vec()
        };
        out.keys.push(key);
        out.values.push(value);
        out.metas.push(meta);
    }
    Ok(out)
}

/// Puts `values` under `keys`, with the GIL released while the bytes are copied into the
/// agent's staging area and the commits answered.
fn put_all(
    py: Python<'_>,
    deadline: Deadline<'_>,
    client: &nencache_client::Client,
    items: &Items,
    ttl: Option<Duration>,
) -> PyResult<Vec<&'static str>> {
    let puts: Vec<Put<'_>> = items
        .keys
        .iter()
        .zip(&items.values)
        .zip(&items.metas)
        .map(|((key, value), metadata)| Put {
            key,
            value: value.as_slice(),
            metadata,
            ttl,
        })
        .collect();
    let outcomes = wait(py, deadline, client.put_many(&puts))?;
    Ok(outcomes.into_iter().map(convert::outcome).collect())
}

#[pymethods]
impl Client {
    /// Connects to the agent (see the class's documentation). `timeout`: the longest any call
    /// (connecting included) may wait for the agent, in seconds or as a `timedelta`, after
    /// which it raises `nencache.Timeout` (`None`: no limit). `verify_puts` sends a checksum
    /// with each put, which the agent verifies after copying; `fast_path=False` sends every
    /// call over gRPC instead of the session's binary frames; `name` appears in the agent's
    /// logs.
    #[new]
    #[pyo3(signature = (socket = None, *, timeout = None, verify_puts = false, fast_path = true, name = None))]
    fn new(
        py: Python<'_>,
        socket: Option<PathBuf>,
        timeout: Option<&Bound<'_, PyAny>>,
        verify_puts: bool,
        fast_path: bool,
        name: Option<String>,
    ) -> PyResult<Self> {
        // Made absolute now: the client reconnects by this path after an agent restart,
        // whatever the process's working directory is by then.
        let socket = socket.unwrap_or_else(resolve_default_socket);
        let socket = std::path::absolute(&socket).unwrap_or(socket);
        let timeout = convert::seconds(timeout, "timeout")?;
        let mut options = ClientOptions {
            verify_puts,
            fast_path,
            ..ClientOptions::default()
        };
        if let Some(name) = name {
            options.client_name = name;
        }
        let deadline = timeout.map(|t| (t, socket.as_path()));
        let connect = nencache_client::Client::connect_with(&socket, options);
        let client = wait(py, deadline, connect)?;
        Ok(Self {
            inner: RwLock::new(Some(client)),
            socket,
            timeout,
            pid: std::process::id(),
        })
    }

    /// The agent's socket path.
    #[getter]
    fn socket(&self) -> String {
        path_str(&self.socket)
    }

    /// The longest any call may wait, in seconds (`None`: no limit).
    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.timeout.map(|t| t.as_secs_f64())
    }

    /// The current session's id (it changes when the client reconnects).
    #[getter]
    fn session(&self) -> PyResult<u64> {
        Ok(self.client()?.session())
    }

    /// What the agent announced when the current session was attached: `agent_version`,
    /// `protocol_version`, `arena_size`, `staging_size`, `page_size` and `limits` (a dict:
    /// `max_key_len`, `max_value_len`, `max_metadata_len`, `max_batch`, ...).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        convert::info(py, &self.client()?.info())
    }

    /// Puts one value under `key` (bytes or str). `value` is any C-contiguous object with the
    /// buffer protocol (bytes, bytearray, memoryview, a numpy array) or a contiguous CPU
    /// torch tensor; its bytes are copied once, straight into the agent's shared staging
    /// area. `metadata`: bytes stored with the value (at most 4 KiB). `ttl`: seconds or a
    /// `timedelta` (`None`: the agent's default). Answers `"stored"`, or `"exists"` when the
    /// key is already cached (nothing is written), or `"checksum_mismatch"` (only with
    /// `verify_puts`). Do not modify the value while the call runs.
    #[pyo3(signature = (key, value, *, metadata = None, ttl = None))]
    fn put(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<&'static str> {
        let client = self.client()?;
        let key = convert::key(key)?;
        let value = convert::value(value, &key)?;
        let metadata = convert::metadata(metadata)?;
        let ttl = convert::ttl(ttl)?;
        let items = Items {
            keys: vec![key],
            values: vec![value],
            metas: vec![metadata],
        };
        let outcomes = put_all(py, self.deadline(), &client, &items, ttl)?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| convert::error_class("Error", "the agent answered no outcome"))
    }

    /// Puts a batch: `items` is a mapping of key to value, or an iterable of `(key, value)` or
    /// `(key, value, metadata)` tuples; `metadata` applies to items without their own, `ttl`
    /// to all. Values are taken as in `put`. Answers one outcome per item, in order. Batches
    /// of any size are split to fit the agent's limits; when a later part is refused after an
    /// earlier one was stored, the exception's `outcomes` gives each item's fate (`None`:
    /// not stored).
    #[pyo3(signature = (items, *, metadata = None, ttl = None))]
    fn put_many(
        &self,
        py: Python<'_>,
        items: &Bound<'_, PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<&'static str>> {
        let client = self.client()?;
        let metadata = convert::metadata(metadata)?;
        let ttl = convert::ttl(ttl)?;
        let items = put_items(items, &metadata)?;
        put_all(py, self.deadline(), &client, &items, ttl)
    }

    /// Gets values: answers a `nencache.Values` list with, per key, a `nencache.Value` (a
    /// read-only zero-copy view of the cache's shared memory, holding a lease) or `None` when
    /// the key is not cached. Use the list (or each value) in a `with` block, or call
    /// `release()`: afterwards a use raises `ValueError`. Values still referenced when they
    /// are garbage-collected return their leases then.
    fn get<'py>(&self, py: Python<'py>, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client()?;
        let keys = convert::keys(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let found = wait(py, self.deadline(), client.get(&refs))?;
        let mut items = Vec::with_capacity(found.len());
        for (key, v) in keys.into_iter().zip(found) {
            items.push(match v {
                Some(v) => Some(Bound::new(py, Value::new(key, v))?.into_any()),
                None => None,
            });
        }
        convert::values_list(py, items)
    }

    /// How many leading `keys` are cached (a prompt's chunk keys, in order; stops at the first
    /// miss), and the tier of each of those: `"host"`, `"nvme"` or `"disk"`. Takes no lease.
    fn lookup(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, Vec<&'static str>)> {
        let client = self.client()?;
        let keys = convert::keys(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let (hits, tiers) = wait(py, self.deadline(), client.lookup(&refs))?;
        Ok((hits, tiers.into_iter().map(convert::tier).collect()))
    }

    /// Deletes keys from every tier; answers how many existed. Values already got stay
    /// readable until released.
    fn delete(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<usize> {
        let client = self.client()?;
        let keys = convert::keys(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        wait(py, self.deadline(), client.delete(&refs))
    }

    /// The agent's counters and gauges, as a dict: `hits`, `misses`, `commits`, `leases`,
    /// `sessions`, ..., and `tiers`, a list with one dict per tier (`tier`, `capacity_bytes`,
    /// `used_bytes`, `entries`, `evictions`, `hits`, ...), host memory first.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.client()?;
        let s = wait(py, self.deadline(), client.stats())?;
        convert::stats(py, s)
    }

    /// Returns the leases of every value released so far and waits until the agent has
    /// applied them (they are otherwise returned in the background, in batches).
    fn flush_releases(&self, py: Python<'_>) -> PyResult<()> {
        let client = self.client()?;
        wait(py, self.deadline(), client.flush_releases())
    }

    /// Closes the client: later calls raise `ValueError`. Values got from it stay valid
    /// until released (they keep their session open); the session ends with the last of
    /// them. Calling it again does nothing.
    fn close(&self) {
        let client = self.inner.write().take();
        drop(client);
    }

    /// Returns the client itself.
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Closes the client (see `close`); exceptions propagate.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        let state = match &*self.inner.read() {
            Some(c) => format!("session={:#x}", c.session()),
            None => "closed".to_owned(),
        };
        format!(
            "<nencache.Client socket={:?} {state}>",
            path_str(&self.socket)
        )
    }
}
