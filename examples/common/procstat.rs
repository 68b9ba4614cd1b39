//! CPU time and memory of a process from `/proc` (Linux), shared by the
//! benchmark examples (`#[path = "common/procstat.rs"] mod procstat;`).

#![allow(dead_code)]

use std::error::Error;

type BoxError = Box<dyn Error + Send + Sync>;

/// utime + stime of `pid` (`"self"` for this process), in clock ticks.
pub fn cpu_ticks(pid: &str) -> Result<u64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("odd /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).ok_or("no utime")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
pub fn clock_ticks_per_s() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU seconds (user + system) of `pid` so far.
pub fn cpu_seconds(pid: &str) -> Result<f64, BoxError> {
    Ok(cpu_ticks(pid)? as f64 / clock_ticks_per_s() as f64)
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: &str) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("odd VmRSS")?.parse()?)
}
