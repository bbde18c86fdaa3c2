//! Process and machine counters from `/proc`: RSS, CPU time and the machine's busy time.

use std::path::PathBuf;

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Why a `/proc` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: unexpected format")]
    Format(String),
}

/// Whom to sample: a process id, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Pid(u32),
    Myself,
}

impl Target {
    fn dir(self) -> PathBuf {
        match self {
            Target::Pid(pid) => PathBuf::from(format!("/proc/{pid}")),
            Target::Myself => PathBuf::from("/proc/self"),
        }
    }
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
}

fn read(path: PathBuf) -> Result<String, ProcError> {
    std::fs::read_to_string(&path).map_err(|source| ProcError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The command name of a process.
pub fn name(target: Target) -> String {
    read(target.dir().join("comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

pub fn sample(target: Target) -> Result<ProcSample, ProcError> {
    let dir = target.dir();
    let stat_path = dir.join("stat");
    let stat = read(stat_path.clone())?;
    let cpu_ticks =
        parse_stat_cpu(&stat).ok_or_else(|| ProcError::Format(stat_path.display().to_string()))?;
    let status_path = dir.join("status");
    let status = read(status_path.clone())?;
    let rss_kib = parse_status_rss(&status)
        .ok_or_else(|| ProcError::Format(status_path.display().to_string()))?;
    Ok(ProcSample { rss_kib, cpu_ticks })
}

/// utime + stime from `/proc/<pid>/stat` (fields 14 and 15, counted after the `(comm)`,
/// which may itself hold spaces and parentheses).
pub fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` from `/proc/<pid>/status`, in KiB.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The machine's CPU time: busy and total ticks, over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineSample {
    pub busy: u64,
    /// Interrupt and softirq time (loopback networking runs much of its work there).
    pub irq: u64,
    pub total: u64,
}

pub fn machine() -> Result<MachineSample, ProcError> {
    let text = read(PathBuf::from("/proc/stat"))?;
    parse_machine(&text).ok_or_else(|| ProcError::Format("/proc/stat".into()))
}

/// The first `cpu` line of `/proc/stat`: idle and iowait are not busy.
pub fn parse_machine(stat: &str) -> Option<MachineSample> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    let irq = values.get(5).copied().unwrap_or(0) + values.get(6).copied().unwrap_or(0);
    Some(MachineSample {
        busy: total - idle,
        irq,
        total,
    })
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(before: u64, after: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / TICKS_PER_SEC / seconds * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_skips_odd_command_names() {
        let stat = "4242 (herald (x) y) S 1 2 3 0 -1 4194304 99 0 0 0 250 50 0 0 20 0 9 0 541282 3133440 390";
        assert_eq!(parse_stat_cpu(stat), Some(300));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn status_rss() {
        let status = "Name:\therald\nVmPeak:\t  9000 kB\nVmRSS:\t    2184 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status), Some(2184));
        assert_eq!(parse_status_rss("Name:\tkthread\n"), None);
    }

    #[test]
    fn machine_busy_time() {
        let stat = "cpu  100 5 20 800 10 0 3 2 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(
            parse_machine(stat),
            Some(MachineSample {
                busy: 130,
                irq: 3,
                total: 940
            })
        );
        assert!((cpu_percent(100, 250, 1.5) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(Target::Myself).expect("/proc/self");
        assert!(s.rss_kib > 0);
        assert!(machine().expect("/proc/stat").total > 0);
    }
}
