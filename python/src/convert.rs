//! Conversions between Python objects and the Rust client's types: keys, value buffers,
//! tokens, TTLs, errors, and the dictionaries `info` and `stats` answer.

use std::time::Duration;

use nencache_api::v1;
use nencache_client::{AgentInfo, ClientError, PutOutcome};
use pyo3::{
    buffer::PyUntypedBuffer,
    exceptions::{PyBufferError, PyTypeError, PyValueError},
    prelude::*,
    sync::PyOnceLock,
    types::{PyByteArray, PyBytes, PyDict, PyInt, PyList, PyMemoryView, PyString, PyType},
};

/// The package's module holding the exception classes.
const ERRORS: &str = "nencache._errors";

/// A Python type name, for messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// A key: `bytes`-like (copied; keys are at most 256 bytes) or `str` (its UTF-8 bytes).
pub(crate) fn key(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_str()?.as_bytes().to_vec());
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    match PyUntypedBuffer::get(obj) {
        Ok(buf) if buf.is_c_contiguous() => Ok(bytes_of(&buf).to_vec()),
        Ok(_) => Err(PyBufferError::new_err(
            "a key must be a contiguous buffer (bytes, bytearray, memoryview) or str",
        )),
        Err(_) => Err(PyTypeError::new_err(format!(
            "a key must be bytes or str, not {}",
            type_name(obj)
        ))),
    }
}

/// A batch of keys: any iterable of keys, but not a single key (whose iteration would give
/// its bytes or characters).
pub(crate) fn keys(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    if obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyBytes>()
        || obj.is_instance_of::<PyByteArray>()
        || obj.is_instance_of::<PyMemoryView>()
    {
        return Err(PyTypeError::new_err(format!(
            "keys must be a list (or other iterable) of keys, not a single {}: pass [key]",
            type_name(obj)
        )));
    }
    let it = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "keys must be a list (or other iterable) of keys, not {}",
            type_name(obj)
        ))
    })?;
    it.map(|k| key(&k?)).collect()
}

/// The bytes of a buffer the caller checked to be C-contiguous.
pub(crate) fn bytes_of(buf: &PyUntypedBuffer) -> &[u8] {
    let len = buf.len_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: a C-contiguous buffer's memory is `len_bytes` bytes from `buf_ptr`, valid and
    // unmoved while `buf` (the export) lives, which the returned borrow cannot outlive. The
    // exporter may still let another thread write the memory; that is the buffer protocol's
    // contract (as for any C extension reading a buffer): the caller must not modify a value
    // while a put of it runs, and nothing here relies on the bytes staying the same.
    unsafe { std::slice::from_raw_parts(buf.buf_ptr().cast::<u8>(), len) }
}

/// Where a value's bytes are: an exported buffer, or the memory of a CPU torch tensor (which
/// has no buffer protocol of its own), kept alive by a reference to the tensor.
pub(crate) enum Bytes {
    /// A buffer export (released when dropped).
    Buffer(PyUntypedBuffer),
    /// A contiguous CPU tensor's memory.
    Tensor {
        /// Keeps the tensor, and so its storage, alive.
        _owner: Py<PyAny>,
        /// Its data pointer.
        ptr: usize,
        /// Its size in bytes.
        len: usize,
    },
}

impl Bytes {
    /// The bytes, in place.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Buffer(b) => bytes_of(b),
            Self::Tensor { len: 0, .. } => &[],
            // SAFETY: `ptr` is the data pointer of a contiguous CPU tensor of `len` bytes,
            // checked when this was made; `_owner` keeps the tensor (and its storage) alive
            // as long as `self`, which the borrow cannot outlive. As for buffers, the caller
            // must not write the tensor while a put of it runs.
            Self::Tensor { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(*ptr as *const u8, *len)
            },
        }
    }
}

/// A value to put: any C-contiguous object with the buffer protocol (`bytes`, `bytearray`,
/// `memoryview`, numpy arrays, ...), or a contiguous CPU torch tensor. Nothing is copied.
pub(crate) fn value(obj: &Bound<'_, PyAny>, key: &[u8]) -> PyResult<Bytes> {
    let name = || String::from_utf8_lossy(key).into_owned();
    match PyUntypedBuffer::get(obj) {
        Ok(buf) if buf.is_c_contiguous() => Ok(Bytes::Buffer(buf)),
        Ok(buf) => Err(PyBufferError::new_err(format!(
            "the value of key {:?} is not C-contiguous (shape {:?}, strides {:?}): values are \
             stored as their bytes in order; pass numpy.ascontiguousarray(x) or x.contiguous()",
            name(),
            buf.shape(),
            buf.strides()
        ))),
        Err(e) if e.is_instance_of::<PyTypeError>(obj.py()) => match tensor(obj, key)? {
            Some(t) => Ok(t),
            None => Err(PyTypeError::new_err(format!(
                "the value of key {:?} must support the buffer protocol (bytes, bytearray, \
                 memoryview, a numpy array, a CPU torch tensor), not {}",
                name(),
                type_name(obj)
            ))),
        },
        // A zero-dimensional array exports no shape, which the buffer reader refuses.
        Err(e) if obj.getattr("ndim").is_ok_and(|n| n.eq(0).unwrap_or(false)) => {
            Err(PyBufferError::new_err(format!(
                "the value of key {:?} is a zero-dimensional array ({e}): values are \
                 buffers of one or more dimensions; pass x.reshape(1)",
                name()
            )))
        }
        Err(e) => Err(e),
    }
}

/// A torch tensor's memory (`data_ptr`, `nbytes`); `None` when `obj` is not a
/// `torch.Tensor`. Only a real tensor is read through its address: torch is not a dependency,
/// so it is looked up among the modules already imported (a process that has a tensor has
/// imported torch), and an object that merely looks like a tensor is never trusted with a
/// raw pointer.
fn tensor(obj: &Bound<'_, PyAny>, key: &[u8]) -> PyResult<Option<Bytes>> {
    let modules = obj.py().import("sys")?.getattr("modules")?;
    let Ok(torch) = modules.get_item("torch") else {
        return Ok(None);
    };
    let Ok(tensor_type) = torch.getattr("Tensor") else {
        return Ok(None);
    };
    if !obj.is_instance(&tensor_type)? {
        return Ok(None);
    }
    let name = String::from_utf8_lossy(key);
    let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" {
        return Err(PyTypeError::new_err(format!(
            "the value of key {name:?} is a tensor on {device}: only CPU memory can be put \
             (copy it with tensor.cpu())"
        )));
    }
    if !obj.call_method0("is_contiguous")?.extract::<bool>()? {
        return Err(PyBufferError::new_err(format!(
            "the value of key {name:?} is a non-contiguous tensor: pass tensor.contiguous()"
        )));
    }
    let ptr: usize = obj.call_method0("data_ptr")?.extract()?;
    let len: usize = obj.getattr("nbytes")?.extract()?;
    if ptr == 0 && len > 0 {
        return Err(PyValueError::new_err(format!(
            "the value of key {name:?} is a tensor without memory"
        )));
    }
    Ok(Some(Bytes::Tensor {
        _owner: obj.clone().unbind(),
        ptr,
        len,
    }))
}

/// Metadata: `None` (empty) or a bytes-like object, copied (at most a few KiB).
pub(crate) fn metadata(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u8>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    match PyUntypedBuffer::get(obj) {
        Ok(buf) if buf.is_c_contiguous() => Ok(bytes_of(&buf).to_vec()),
        _ => Err(PyTypeError::new_err(format!(
            "metadata must be bytes (or another contiguous buffer) or None, not {}",
            type_name(obj)
        ))),
    }
}

/// A TTL: `None` (the agent's default), seconds as a number, or a `datetime.timedelta`.
pub(crate) fn ttl(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Duration>> {
    seconds(obj, "ttl")
}

/// A positive duration named `what`: `None`, seconds as a number, or a `datetime.timedelta`.
pub(crate) fn seconds(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Duration>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let secs: f64 = if obj.hasattr("total_seconds")? {
        obj.call_method0("total_seconds")?.extract()?
    } else {
        obj.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "{what} must be seconds (a number), a datetime.timedelta or None, not {}",
                type_name(obj)
            ))
        })?
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(invalid_argument(
            obj.py(),
            &format!("{what} must be a positive number of seconds, not {secs}"),
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map(Some)
        .map_err(|e| invalid_argument(obj.py(), &format!("{what} of {secs} s: {e}")))
}

/// Token ids: a sequence of ints, or a buffer of integers (a numpy array, `array.array`).
pub(crate) fn tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let out_of_range = |t: &dyn std::fmt::Display| {
        invalid_argument(
            obj.py(),
            &format!("token ids are 0 to 4294967295 (u32), not {t}"),
        )
    };
    if let Ok(buf) = PyUntypedBuffer::get(obj)
        && buf.is_c_contiguous()
        && buf.dimensions() == 1
    {
        let format = buf.format().to_bytes();
        let code = format.last().copied().unwrap_or(b'B');
        let b = bytes_of(&buf);
        let size = buf.item_size();
        let signed = matches!(code, b'b' | b'h' | b'i' | b'l' | b'q' | b'n');
        let unsigned = matches!(code, b'B' | b'H' | b'I' | b'L' | b'Q' | b'N');
        let native = format.len() == 1 || matches!(format.first(), Some(b'@' | b'=' | b'<'));
        if (signed || unsigned) && native && matches!(size, 1 | 2 | 4 | 8) {
            return b
                .chunks_exact(size)
                .map(|c| {
                    let mut le = [0u8; 8];
                    le[..size].copy_from_slice(c);
                    let raw = u64::from_le_bytes(le);
                    let v = if signed {
                        // Sign-extend from `size` bytes.
                        let shift = 64 - 8 * size as u32;
                        i128::from(((raw << shift) as i64) >> shift)
                    } else {
                        i128::from(raw)
                    };
                    u32::try_from(v).map_err(|_| out_of_range(&v))
                })
                .collect();
        }
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err("tokens must be integers, not a str"));
    }
    let it = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "tokens must be a sequence of integers, not {}",
            type_name(obj)
        ))
    })?;
    it.map(|t| {
        let t = t?;
        let v: i128 = t.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "a token id must be an integer, not {}",
                type_name(&t)
            ))
        })?;
        u32::try_from(v).map_err(|_| out_of_range(&v))
    })
    .collect()
}

/// A put's outcome, as the API names it.
pub(crate) fn outcome(o: PutOutcome) -> &'static str {
    match o {
        PutOutcome::Stored => "stored",
        PutOutcome::Exists => "exists",
        PutOutcome::ChecksumMismatch => "checksum_mismatch",
    }
}

/// A tier, as the API names it.
pub(crate) fn tier(t: v1::Tier) -> &'static str {
    match t {
        v1::Tier::Host => "host",
        v1::Tier::Nvme => "nvme",
        v1::Tier::Disk => "disk",
        v1::Tier::Gpu => "gpu",
        v1::Tier::Unspecified => "unspecified",
    }
}

/// The exception class for a refusal with gRPC code `c`.
fn class_of_code(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::InvalidArgument | C::OutOfRange => "InvalidArgument",
        C::NotFound => "NotFound",
        C::ResourceExhausted => "ResourceExhausted",
        C::Unavailable => "Disconnected",
        _ => "Error",
    }
}

/// A chunk size: a positive integer (any other integer is an `InvalidArgument`, whatever its
/// size; a non-integer a `TypeError`).
pub(crate) fn chunk_size(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    if !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "chunk_size must be an integer, not {}",
            type_name(obj)
        )));
    }
    match obj.extract::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid_argument(
            obj.py(),
            &format!("chunk_size must be a positive integer, not {obj}"),
        )),
    }
}

/// The class, code and message of an error.
fn describe(e: &ClientError) -> (&'static str, Option<&'static str>, String) {
    match e {
        ClientError::Connect { socket, reason } => (
            "ConnectionError",
            None,
            format!(
                "no nencache agent answers at {}: {reason}; is nencache-agent serving there? \
                 Pass socket= or set NENCACHE_SOCKET to use another socket",
                socket.display()
            ),
        ),
        ClientError::Attach(_) => ("ConnectionError", None, e.to_string()),
        ClientError::Disconnected(_) => (
            "Disconnected",
            None,
            format!("{e} (the agent stopped or restarted; the next call reconnects)"),
        ),
        ClientError::Status(s) => (
            class_of_code(s.code()),
            Some(nencache_api::code_name(s.code())),
            s.message().to_owned(),
        ),
        ClientError::Invalid(m) => ("InvalidArgument", Some("INVALID_ARGUMENT"), m.clone()),
        ClientError::PartialPut { source, .. } => {
            let (class, code, _) = describe(source);
            (class, code, e.to_string())
        }
        ClientError::Io { .. } | ClientError::Protocol(_) => ("Error", None, e.to_string()),
    }
}

/// The Python exception for a client error: a class of `nencache._errors`, with `code` (the
/// gRPC code's name when the agent refused) and `outcomes` (for a partly done put batch).
pub(crate) fn error(py: Python<'_>, e: &ClientError) -> PyErr {
    let (class, code, message) = describe(e);
    let outcomes = match e {
        ClientError::PartialPut { outcomes, .. } => Some(
            outcomes
                .iter()
                .map(|o| o.map(outcome))
                .collect::<Vec<Option<&str>>>(),
        ),
        _ => None,
    };
    exception(py, class, &message, code, outcomes).unwrap_or_else(|failed| failed)
}

/// `nencache.InvalidArgument(message)`.
pub(crate) fn invalid_argument(py: Python<'_>, message: &str) -> PyErr {
    exception(
        py,
        "InvalidArgument",
        message,
        Some("INVALID_ARGUMENT"),
        None,
    )
    .unwrap_or_else(|failed| failed)
}

/// An instance of the exception class `class` of `nencache._errors`.
fn exception(
    py: Python<'_>,
    class: &str,
    message: &str,
    code: Option<&str>,
    outcomes: Option<Vec<Option<&str>>>,
) -> PyResult<PyErr> {
    let cls = py.import(ERRORS)?.getattr(class)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("code", code)?;
    kwargs.set_item("outcomes", outcomes)?;
    Ok(PyErr::from_value(cls.call((message,), Some(&kwargs))?))
}

/// `nencache.Values(items)`: the list a get answers, also a context manager.
pub(crate) fn values_list<'py>(
    py: Python<'py>,
    items: Vec<Option<Bound<'py, PyAny>>>,
) -> PyResult<Bound<'py, PyAny>> {
    static VALUES: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let list = PyList::new(py, items)?;
    VALUES
        .import(py, "nencache._values", "Values")?
        .call1((list,))
}

/// `info`: what the agent announced when the session was attached.
pub(crate) fn info<'py>(py: Python<'py>, i: &AgentInfo) -> PyResult<Bound<'py, PyDict>> {
    let v1::Limits {
        max_key_len,
        max_value_len,
        max_metadata_len,
        max_batch,
        max_leases_per_session,
        reservation_timeout_ms,
        max_reservations_per_session,
        max_staging_per_session,
        max_frame_len,
        max_message_len,
    } = i.limits;
    let limits = PyDict::new(py);
    limits.set_item("max_key_len", max_key_len)?;
    limits.set_item("max_value_len", max_value_len)?;
    limits.set_item("max_metadata_len", max_metadata_len)?;
    limits.set_item("max_batch", max_batch)?;
    limits.set_item("max_leases_per_session", max_leases_per_session)?;
    limits.set_item("reservation_timeout_ms", reservation_timeout_ms)?;
    limits.set_item("max_reservations_per_session", max_reservations_per_session)?;
    limits.set_item("max_staging_per_session", max_staging_per_session)?;
    limits.set_item("max_frame_len", max_frame_len)?;
    limits.set_item("max_message_len", max_message_len)?;
    let d = PyDict::new(py);
    d.set_item("agent_version", &i.agent_version)?;
    d.set_item("protocol_version", i.protocol_version)?;
    d.set_item("arena_size", i.arena_size)?;
    d.set_item("staging_size", i.staging_size)?;
    d.set_item("page_size", i.page_size)?;
    d.set_item("limits", limits)?;
    Ok(d)
}

/// `stats`: every field of the agent's `StatsResponse`, tiers as a list of dicts (named by
/// tier). The destructuring is exhaustive, so a field added to the API fails the build here
/// until it is added to the dictionary.
pub(crate) fn stats(py: Python<'_>, s: v1::StatsResponse) -> PyResult<Bound<'_, PyDict>> {
    let v1::StatsResponse {
        tiers,
        hits,
        misses,
        lookup_keys,
        lookup_hits,
        commits,
        expirations,
        deletes,
        leases,
        reservations,
        sessions,
        reclaimed_leases,
        reclaimed_reservations,
        checksum_failures,
        no_space,
        staging_bytes,
        staging_used_bytes,
        promotions,
        demotions,
        evictions_unsaved,
    } = s;
    let d = PyDict::new(py);
    let mut list = Vec::with_capacity(tiers.len());
    for t in tiers {
        let v1::TierStats {
            tier: which,
            capacity_bytes,
            used_bytes,
            entries,
            evictions,
            hits,
            read_bytes,
            written_bytes,
            io_errors,
            corrupt_entries,
            degraded,
            io_engine,
        } = t;
        let td = PyDict::new(py);
        td.set_item(
            "tier",
            tier(v1::Tier::try_from(which).unwrap_or(v1::Tier::Unspecified)),
        )?;
        td.set_item("capacity_bytes", capacity_bytes)?;
        td.set_item("used_bytes", used_bytes)?;
        td.set_item("entries", entries)?;
        td.set_item("evictions", evictions)?;
        td.set_item("hits", hits)?;
        td.set_item("read_bytes", read_bytes)?;
        td.set_item("written_bytes", written_bytes)?;
        td.set_item("io_errors", io_errors)?;
        td.set_item("corrupt_entries", corrupt_entries)?;
        td.set_item("degraded", degraded)?;
        td.set_item("io_engine", io_engine)?;
        list.push(td);
    }
    d.set_item("tiers", list)?;
    for (name, v) in [
        ("hits", hits),
        ("misses", misses),
        ("lookup_keys", lookup_keys),
        ("lookup_hits", lookup_hits),
        ("commits", commits),
        ("expirations", expirations),
        ("deletes", deletes),
        ("leases", leases),
        ("reservations", reservations),
        ("sessions", sessions),
        ("reclaimed_leases", reclaimed_leases),
        ("reclaimed_reservations", reclaimed_reservations),
        ("checksum_failures", checksum_failures),
        ("no_space", no_space),
        ("staging_bytes", staging_bytes),
        ("staging_used_bytes", staging_used_bytes),
        ("promotions", promotions),
        ("demotions", demotions),
        ("evictions_unsaved", evictions_unsaved),
    ] {
        d.set_item(name, v)?;
    }
    Ok(d)
}

/// An instance of the exception class `class` of `nencache._errors`, without a code.
pub(crate) fn error_class(class: &str, message: &str) -> PyErr {
    Python::attach(|py| exception(py, class, message, None, None).unwrap_or_else(|failed| failed))
}
