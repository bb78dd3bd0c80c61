//! The device baseline: `fio` (from the distribution: `apt-get install -y fio`) run on a file
//! in the same directory as the store, with `direct=1`, `ioengine=io_uring` and the store's
//! queue depth, its JSON report parsed for bandwidth and latency percentiles.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use serde_json::Value;

/// One fio job.
#[derive(Debug, Clone)]
pub struct Job {
    /// The file (created by a write job, read by a read job).
    pub file: PathBuf,
    /// Bytes of the file, and bytes moved.
    pub size: u64,
    /// Block size in bytes.
    pub bs: u64,
    /// `write`, `read`, `randread`.
    pub rw: &'static str,
    /// I/Os in flight.
    pub iodepth: u32,
    /// fio's `ioengine`.
    pub engine: String,
}

/// What one fio job measured.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds the job ran.
    pub secs: f64,
    /// Completion-to-submission latency of one I/O, 50th percentile, µs.
    pub p50_us: f64,
    /// The same, 99th percentile.
    pub p99_us: f64,
}

impl Run {
    /// Bandwidth in GB/s (10^9 bytes).
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e9
    }

    /// Adds a later run of the same job (bytes and time; the percentiles are the latest's).
    pub fn append(&mut self, o: &Self) {
        self.bytes += o.bytes;
        self.secs += o.secs;
        self.p50_us = o.p50_us;
        self.p99_us = o.p99_us;
    }
}

/// Several runs of one job as one: bytes over time summed, and the median of each run's
/// percentiles. `None` for no runs.
pub fn combine(runs: &[Run]) -> Option<Run> {
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (!runs.is_empty()).then(|| Run {
        bytes: runs.iter().map(|r| r.bytes).sum(),
        secs: runs.iter().map(|r| r.secs).sum(),
        p50_us: median(|r| r.p50_us),
        p99_us: median(|r| r.p99_us),
    })
}

/// fio's version line, or a message saying how to install it.
pub fn check() -> anyhow::Result<String> {
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => bail!(
            "fio --version failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "fio is not installed; it is the baseline every figure here is compared with. \
             Install it with `apt-get install -y fio` (Debian, Ubuntu) or `dnf install fio`, \
             or pass --no-fio to measure without a baseline"
        ),
        Err(e) => Err(e).context("running fio"),
    }
}

/// Runs one job and parses its JSON report.
pub fn run(job: &Job) -> anyhow::Result<Run> {
    let out = Command::new("fio")
        .arg(format!("--name=nencache-{}", job.rw))
        .arg(format!("--filename={}", job.file.display()))
        .arg(format!("--size={}", job.size))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--ioengine={}", job.engine))
        .args([
            "--direct=1",
            "--numjobs=1",
            "--lat_percentiles=1",
            "--output-format=json",
        ])
        .output()
        .context("running fio (apt-get install -y fio)")?;
    if !out.status.success() {
        bail!(
            "fio {} on {} failed: {}{}",
            job.rw,
            job.file.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout), job.rw)
}

/// Parses fio's JSON report (fio may print notes before it).
fn parse(text: &str, rw: &str) -> anyhow::Result<Run> {
    let start = text.find('{').context("fio printed no JSON report")?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio's JSON report")?;
    let dir = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let d = &v["jobs"][0][dir];
    let num = |v: &Value| {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    let bytes = num(&d["io_bytes"]).context("fio report without io_bytes")? as u64;
    let ms = num(&d["runtime"]).context("fio report without runtime")?;
    let pct = |q: &str| num(&d["lat_ns"]["percentile"][q]).unwrap_or(0.0) / 1e3;
    if bytes == 0 {
        bail!("fio moved no bytes");
    }
    Ok(Run {
        bytes,
        secs: ms / 1e3,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

/// Deletes a file if it exists.
pub fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report() -> anyhow::Result<()> {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"x","read":{"io_bytes":1073741824,
"bw_bytes":536870912,"runtime":2000,"lat_ns":{"min":1,"max":2,"mean":1.5,
"percentile":{"1.000000":1000,"50.000000":104000,"99.000000":250000}}},
"write":{"io_bytes":0,"runtime":0}}]}"#;
        let r = parse(text, "randread")?;
        assert_eq!(r.bytes, 1 << 30);
        assert!((r.secs - 2.0).abs() < 1e-9);
        assert!((r.p50_us - 104.0).abs() < 1e-9);
        assert!((r.p99_us - 250.0).abs() < 1e-9);
        assert!((r.gbps() - 0.536_870_912).abs() < 1e-9);
        assert!(parse(text, "write").is_err(), "a job that moved nothing");
        let mut other = r.clone();
        other.p50_us = 50.0;
        let both = combine(&[r.clone(), other.clone(), other]).context("combined")?;
        assert_eq!(both.bytes, 3 << 30);
        assert!((both.p50_us - 50.0).abs() < 1e-9, "the median");
        assert!(combine(&[]).is_none());
        Ok(())
    }
}
