//! The agent's own cgroup: limits in force and live usage, read with
//! cgroups-rs on both cgroup v1 and v2. Inside a container this is the
//! container's cgroup; on a host it is whatever cgroup the agent was started in.

use std::collections::HashMap;
use std::path::PathBuf;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{hierarchies, Cgroup, MaxValue};

#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub version: u32,
    pub memory_limit_bytes: Option<u64>,
    pub pids_limit: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    pub cpu_usage_us: u64,
    pub pids_current: u64,
    pub oom_events: u64,
    pub oom_kills: u64,
    pub note: String,
}

pub struct OwnCgroup {
    cgroup: Option<Cgroup>,
    v2_dir: Option<PathBuf>,
    /// The one file holding the OOM kill counter (`memory.events` on v2,
    /// `memory.oom_control` on v1), read before and after every exec.
    oom_file: Option<PathBuf>,
    note: String,
}

/// Limits above this are "unlimited" in cgroup v1 (which reports 2^63 rounded to pages).
const V1_UNLIMITED: i64 = 1 << 62;

impl OwnCgroup {
    pub fn detect() -> Self {
        let paths = match cgroups_rs::fs::cgroup::get_cgroups_relative_paths() {
            Ok(p) => p,
            Err(e) => {
                return Self {
                    cgroup: None,
                    v2_dir: None,
                    oom_file: None,
                    note: format!("cannot read /proc/self/cgroup: {e}"),
                }
            }
        };
        let hier = hierarchies::auto();
        if hier.v2() {
            let rel = paths.get("").cloned().unwrap_or_default();
            let rel = rel.trim_start_matches('/').to_string();
            let dir = PathBuf::from(hierarchies::UNIFIED_MOUNTPOINT).join(&rel);
            Self {
                cgroup: Some(Cgroup::load(hier, rel.as_str())),
                oom_file: Some(dir.join("memory.events")),
                v2_dir: Some(dir),
                note: String::new(),
            }
        } else {
            // /proc/self/cgroup names the cgroup from the host's root, but a
            // container's cgroup mount is rooted at its own cgroup: strip
            // each mount's root, or every read misses.
            let rel: HashMap<String, String> =
                cgroups_rs::fs::cgroup::existing_path(paths.clone()).unwrap_or(paths);
            let oom_file = hierarchies::V1::new()
                .get_mount_point(cgroups_rs::fs::Controllers::Mem)
                .map(|(point, _)| {
                    point
                        .join(
                            rel.get("memory")
                                .map(|r| r.trim_start_matches('/'))
                                .unwrap_or(""),
                        )
                        .join("memory.oom_control")
                });
            Self {
                cgroup: Some(Cgroup::load_with_relative_paths(hier, ".", rel)),
                v2_dir: None,
                oom_file,
                note: String::new(),
            }
        }
    }

    pub fn version(&self) -> u32 {
        match &self.cgroup {
            Some(c) if c.v2() => 2,
            Some(_) => 1,
            None => 0,
        }
    }

    /// Whether a child cgroup per exec can be created here. Docker mounts
    /// cgroup v1 read-only and does not delegate v2 to unprivileged
    /// containers, so this is usually false inside a sandbox.
    pub fn delegated(&self) -> bool {
        match &self.v2_dir {
            Some(dir) => {
                let c =
                    std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
                        .ok();
                // SAFETY: access(2) with a NUL-terminated path.
                c.is_some_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
            }
            None => false,
        }
    }

    /// Processes killed by the OOM killer in this cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        self.oom_file
            .as_deref()
            .and_then(|f| read_keyed(f, "oom_kill"))
            .unwrap_or(0)
    }

    pub fn usage(&self) -> Usage {
        let Some(cg) = &self.cgroup else {
            return Usage {
                note: self.note.clone(),
                ..Default::default()
            };
        };
        let mut u = Usage {
            version: self.version(),
            ..Default::default()
        };
        let mut missing = Vec::new();
        match cg.controller_of::<MemController>() {
            Some(mem) => {
                let m = mem.memory_stat();
                u.memory_current_bytes = m.usage_in_bytes;
                u.memory_peak_bytes = m.max_usage_in_bytes;
                if m.limit_in_bytes > 0 && m.limit_in_bytes < V1_UNLIMITED {
                    u.memory_limit_bytes = Some(m.limit_in_bytes as u64);
                }
                if let Some(dir) = &self.v2_dir {
                    u.oom_events = read_keyed(&dir.join("memory.events"), "oom").unwrap_or(0);
                } else {
                    u.oom_events = m.fail_cnt;
                }
                u.oom_kills = self.oom_kills();
            }
            None => missing.push("memory"),
        }
        match cg.controller_of::<PidController>() {
            Some(p) => {
                u.pids_current = p.get_pid_current().unwrap_or(0);
                if let Ok(MaxValue::Value(v)) = p.get_pid_max() {
                    u.pids_limit = Some(v as u64);
                }
            }
            None => missing.push("pids"),
        }
        if let Some(cpu) = cg.controller_of::<CpuController>() {
            if let (Ok(quota), Ok(period)) = (cpu.cfs_quota(), cpu.cfs_period()) {
                if quota > 0 && period > 0 {
                    u.cpu_limit_millis = Some(quota as u64 * 1000 / period);
                }
            }
            if self.v2_dir.is_some() {
                let stat = cpu.cpu().stat;
                u.cpu_usage_us = keyed(&stat, "usage_usec").unwrap_or(0);
            }
        }
        if self.v2_dir.is_none() {
            match cg.controller_of::<CpuAcctController>() {
                Some(acct) => u.cpu_usage_us = acct.cpuacct().usage / 1000,
                None => missing.push("cpuacct"),
            }
        }
        if !missing.is_empty() {
            u.note = format!("controllers not available: {}", missing.join(", "));
        }
        u
    }
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

fn read_keyed(path: &std::path::Path, key: &str) -> Option<u64> {
    keyed(&std::fs::read_to_string(path).ok()?, key)
}
