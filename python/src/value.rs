//! `nencache.Value`: one value a get found, read in place in the agent's arena.
//!
//! It holds the Rust client's [`nencache_client::Value`] (and with it the lease that keeps the
//! bytes from changing) and exports them with the buffer protocol as a read-only, one-
//! dimensional buffer of unsigned bytes, so `memoryview(v)`, `numpy.frombuffer(v, dtype)` and
//! `torch.frombuffer(v, dtype=...)` read the arena without a copy.
//!
//! Lifetime: `release()` (or the end of a `with` block) ends the value for Python: every later
//! use (a new view, `len`, `tobytes`) raises `ValueError`. Views exported before stay valid:
//! the lease is returned when the last of them is released (release is deferred, never
//! refused), so no view can read memory the agent has reused. Exports are counted in
//! `__getbuffer__` / `__releasebuffer__`.

use std::ffi::{c_int, c_void};

use parking_lot::Mutex;
use pyo3::{
    exceptions::{PyBufferError, PyValueError},
    ffi,
    prelude::*,
    types::PyBytes,
};

/// A value found by `Client.get`: a zero-copy, read-only view of the cache's shared memory,
/// valid until released. Use it as a buffer (`memoryview(v)`, `numpy.frombuffer(v, ...)`),
/// preferably inside `with v:` (or `with client.get(keys) as values:`), or call `release()`.
/// Views taken from it keep the bytes leased until they are themselves released.
#[pyclass(frozen, module = "nencache", name = "Value")]
pub(crate) struct Value {
    key: Vec<u8>,
    metadata: Vec<u8>,
    len: usize,
    state: Mutex<State>,
}

/// What may change: the lease, and the views that need it.
struct State {
    /// The leased value; `None` once its lease has been given back.
    value: Option<nencache_client::Value>,
    /// Buffers exported and not yet released, plus copies in progress.
    exports: usize,
    /// `release()` was called: no new use is allowed.
    released: bool,
}

impl State {
    /// Takes the value when nothing needs it any more, to be dropped (returning the lease)
    /// after the lock is let go.
    fn take_if_done(&mut self) -> Option<nencache_client::Value> {
        if self.released && self.exports == 0 {
            self.value.take()
        } else {
            None
        }
    }
}

impl Value {
    /// Wraps a value found for `key`.
    pub(crate) fn new(key: Vec<u8>, value: nencache_client::Value) -> Self {
        Self {
            key,
            metadata: value.metadata().to_vec(),
            len: value.len(),
            state: Mutex::new(State {
                value: Some(value),
                exports: 0,
                released: false,
            }),
        }
    }

    /// Counts one more use of the bytes and answers where they are, or refuses when the value
    /// was released. Each successful call must be matched by [`Value::unpin`].
    fn pin(&self) -> PyResult<(*const u8, usize)> {
        let mut st = self.state.lock();
        match (&st.value, st.released) {
            (Some(v), false) => {
                let at = (v.as_ptr(), v.len());
                st.exports += 1;
                Ok(at)
            }
            _ => Err(released(&self.key)),
        }
    }

    /// Ends a use counted by [`Value::pin`]; the last one after `release()` returns the lease.
    fn unpin(&self) {
        let done = {
            let mut st = self.state.lock();
            st.exports = st.exports.saturating_sub(1);
            st.take_if_done()
        };
        drop(done);
    }
}

/// The error for a use after release.
fn released(key: &[u8]) -> PyErr {
    PyValueError::new_err(format!(
        "the value of key {:?} was released (its with block ended or release() was called); \
         get it again",
        String::from_utf8_lossy(key)
    ))
}

/// The format of every exported buffer: unsigned bytes.
const FORMAT: &std::ffi::CStr = c"B";

#[pymethods]
impl Value {
    /// Exports the bytes as a read-only buffer (the buffer protocol).
    ///
    /// # Safety
    /// Called by the interpreter with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no view to fill"));
        }
        let this = slf.get();
        if (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
            // Report a released value first: that is the error that matters.
            if this.state.lock().released {
                return Err(released(&this.key));
            }
            return Err(PyBufferError::new_err(
                "a nencache value is read-only (it lives in the agent's shared memory); copy \
                 it (bytearray(v), numpy.array(...)) to modify it",
            ));
        }
        let (ptr, len) = this.pin()?;
        // SAFETY: `view` is non-null (checked above) and points to a `Py_buffer` the
        // interpreter gives us to fill. `ptr` and `len` are the leased bytes in the arena
        // mapping, which stay mapped and unchanged while the Rust value lives: `pin` counted
        // this export, and the value is not dropped until `__releasebuffer__` has uncounted it.
        // `obj` takes a strong reference to `slf`, so the object outlives the view. `shape`
        // and `strides` point into the `Py_buffer` itself, as `PyBuffer_FillInfo` does (the
        // consumer keeps it in place), and the format is a static string.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr.cast_mut().cast::<c_void>();
            (*view).len = len as isize;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
                FORMAT.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
                &raw mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// Ends an export; the last one after `release()` returns the lease.
    ///
    /// # Safety
    /// Called by the interpreter once per successful `__getbuffer__`.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.unpin();
    }

    /// Ends the value for Python: later uses raise `ValueError`. The lease goes back to the
    /// agent now, or, while views exported from this value are alive, when the last of them
    /// is released (release is deferred, never refused). Calling it again does nothing.
    fn release(&self) {
        let done = {
            let mut st = self.state.lock();
            st.released = true;
            st.take_if_done()
        };
        drop(done);
    }

    /// Returns the value itself.
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Releases the value (see `release`); exceptions propagate.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release();
        false
    }

    /// The key this value was found under.
    #[getter]
    fn key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.key)
    }

    /// The metadata stored with the value (a copy, readable after release too).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.metadata)
    }

    /// Whether `release()` was called (or the `with` block ended).
    #[getter]
    fn released(&self) -> bool {
        self.state.lock().released
    }

    /// Whether the lease is still held: until release, and after it while exported views
    /// are alive.
    #[getter]
    fn held(&self) -> bool {
        self.state.lock().value.is_some()
    }

    /// The value's length in bytes.
    fn __len__(&self) -> PyResult<usize> {
        if self.state.lock().released {
            return Err(released(&self.key));
        }
        Ok(self.len)
    }

    /// Always true, even for an empty or released value, so that `if v:` tells a value from
    /// the `None` of a missing key.
    fn __bool__(&self) -> bool {
        true
    }

    /// A copy of the bytes (with the GIL released during the copy).
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let (ptr, len) = self.pin()?;
        let src = ptr as usize;
        let out = PyBytes::new_with(py, len, |dst| {
            py.detach(|| {
                if len > 0 {
                    // SAFETY: `pin` counted this use, so the `len` leased bytes at `src` stay
                    // mapped and unchanged until `unpin` below; `dst` is the new bytes
                    // object's buffer of `len` bytes, which nothing else can see yet.
                    let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
                    dst.copy_from_slice(bytes);
                }
            });
            Ok(())
        });
        self.unpin();
        out
    }

    /// Copies the value into `buffer` (a writable, C-contiguous buffer at least as long as
    /// the value: a `bytearray`, a writable `memoryview`, a numpy array), from the agent's
    /// shared memory straight into it, with the GIL released; answers the number of bytes
    /// copied (the value's length). This is the one copy a client makes to own the bytes.
    fn copy_into(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        let buf = pyo3::buffer::PyUntypedBuffer::get(buffer)?;
        if buf.readonly() {
            return Err(PyBufferError::new_err(
                "copy_into needs a writable buffer (a bytearray, a writable memoryview, a \
                 numpy array)",
            ));
        }
        if !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err(
                "copy_into needs a C-contiguous buffer",
            ));
        }
        if buf.len_bytes() < self.len {
            return Err(PyValueError::new_err(format!(
                "the buffer holds {} bytes, the value of key {:?} is {} bytes",
                buf.len_bytes(),
                String::from_utf8_lossy(&self.key),
                self.len
            )));
        }
        let (ptr, len) = self.pin()?;
        let (src, dst) = (ptr as usize, buf.buf_ptr() as usize);
        py.detach(|| {
            if len > 0 {
                // SAFETY: `pin` counted this use, so the `len` leased bytes at `src` stay
                // mapped and unchanged until `unpin` below. `dst` is the writable,
                // contiguous memory of the buffer export `buf`, at least `len` bytes long
                // (checked above), kept valid by `buf` until after this returns; it cannot
                // overlap the arena, which is mapped read-only in this process.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
            }
        });
        self.unpin();
        drop(buf);
        Ok(len)
    }

    fn __repr__(&self) -> String {
        let st = self.state.lock();
        let what = if st.released {
            if st.value.is_some() {
                "released, views alive".to_owned()
            } else {
                "released".to_owned()
            }
        } else {
            format!("{} bytes", self.len)
        };
        format!(
            "<nencache.Value key={:?} {what}>",
            String::from_utf8_lossy(&self.key)
        )
    }
}
