//! A minimal RESP2 client over a Unix socket: just SET and GET of binary values, reading
//! replies straight into caller-owned buffers, so Redis is measured doing the same copies
//! NenCache's client does.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, bail};

/// A connection to redis-server.
pub struct Redis {
    r: BufReader<UnixStream>,
    w: UnixStream,
    line: String,
}

impl Redis {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let s =
            UnixStream::connect(path).with_context(|| format!("connecting {}", path.display()))?;
        Ok(Self {
            r: BufReader::with_capacity(1 << 20, s.try_clone()?),
            w: s,
            line: String::new(),
        })
    }

    fn header(&mut self) -> anyhow::Result<&str> {
        self.line.clear();
        self.r.read_line(&mut self.line)?;
        if self.line.starts_with('-') {
            bail!("redis error: {}", self.line.trim_end());
        }
        Ok(self.line.trim_end())
    }

    /// SET key value.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        write!(self.w, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len())?;
        self.w.write_all(key)?;
        write!(self.w, "\r\n${}\r\n", value.len())?;
        self.w.write_all(value)?;
        self.w.write_all(b"\r\n")?;
        let h = self.header()?;
        if h != "+OK" {
            bail!("unexpected SET reply {h:?}");
        }
        Ok(())
    }

    /// GET key into `buf`; returns the value length, or `None` when missing.
    pub fn get_into(&mut self, key: &[u8], buf: &mut [u8]) -> anyhow::Result<Option<usize>> {
        write!(self.w, "*2\r\n$3\r\nGET\r\n${}\r\n", key.len())?;
        self.w.write_all(key)?;
        self.w.write_all(b"\r\n")?;
        let h = self.header()?;
        let n: i64 = h
            .strip_prefix('$')
            .context("bulk reply expected")?
            .parse()?;
        if n < 0 {
            return Ok(None);
        }
        let n = n as usize;
        if n > buf.len() {
            bail!("value of {n} bytes exceeds the buffer");
        }
        self.r.read_exact(&mut buf[..n])?;
        let mut crlf = [0u8; 2];
        self.r.read_exact(&mut crlf)?;
        Ok(Some(n))
    }
}
