//! Workspaces with a size the kernel enforces.
//!
//! Each sandbox with a disk limit gets its own ext4 filesystem in a sparse
//! image file (`<data_dir>/disks/img/<id>.img`), loop-mounted by the control
//! plane at `<data_dir>/disks/mnt/<id>` and bind-mounted at `/workspace`. A
//! command that fills it gets ENOSPC (or EDQUOT-like ENOSPC when inodes run
//! out); nothing outside the image is touched, so one sandbox cannot fill the
//! disk the store and the audit log live on. Docker's own size options do
//! not work on every storage driver (not on fuse-overlayfs, not without XFS
//! project quotas); a loop-mounted filesystem works wherever the control
//! plane may mount, which needs root.
//!
//! The mount is made with `mount -o loop`, which sets the loop device to
//! clear itself: the host mount is what keeps it, and unmounting frees it.
//! The mount point itself is root's, mode 0755: were the image ever not
//! mounted when the container starts, the sandbox user could not write to
//! what lies underneath.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {output}")]
    Command { command: String, output: String },
    #[error("the host has {free} bytes free for sandbox disks and this one may grow to {bytes}")]
    NoRoom { free: u64, bytes: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The filesystems of every sandbox with a disk limit.
#[derive(Debug, Clone)]
pub struct Disks {
    images: PathBuf,
    mounts: PathBuf,
}

impl Disks {
    pub fn at(root: &Path) -> Result<Self> {
        let disks = Self {
            images: root.join("img"),
            mounts: root.join("mnt"),
        };
        for dir in [root, &disks.images, &disks.mounts] {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            set_mode(dir, 0o755)?;
        }
        set_mode(&disks.images, 0o700)?;
        Ok(disks)
    }

    fn image(&self, id: &str) -> PathBuf {
        self.images.join(format!("{id}.img"))
    }

    /// Where the sandbox's filesystem is mounted on the host.
    pub fn mount_point(&self, id: &str) -> PathBuf {
        self.mounts.join(id)
    }

    /// Makes and mounts a filesystem of `bytes` for `id`, its root owned by
    /// `uid:gid`; answers the mount point. What a failure leaves is removed.
    pub async fn create(&self, id: &str, bytes: u64, uid: u32, gid: u32) -> Result<PathBuf> {
        let made = self.make(id, bytes, uid, gid).await;
        if made.is_err() {
            let _ = self.remove(id).await;
        }
        made
    }

    async fn make(&self, id: &str, bytes: u64, uid: u32, gid: u32) -> Result<PathBuf> {
        // Images are sparse, so the host's disk can be promised more than it
        // has; at least refuse a sandbox that could fill it on its own.
        let free = self.free_bytes()?;
        if free < bytes {
            return Err(Error::NoRoom { free, bytes });
        }
        let image = self.image(id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&image)
            .map_err(io(format!("creating {}", image.display())))?;
        file.set_len(bytes)
            .map_err(io(format!("sizing {}", image.display())))?;
        drop(file);
        let owner = format!("root_owner={uid}:{gid}");
        // No blocks reserved for root: the sandbox user is never root.
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", "-E", &owner, path_str(&image)?],
        )
        .await?;
        let point = self.mount(id).await?;
        // mkfs leaves a root-only `lost+found`, which a workspace must not
        // have (snapshots could not read it; users would see it).
        let lost = point.join("lost+found");
        std::fs::remove_dir(&lost).map_err(io(format!("removing {}", lost.display())))?;
        Ok(point)
    }

    /// Mounts `id`'s filesystem unless it is mounted already (after a host
    /// restart it is not); answers the mount point.
    pub async fn mount(&self, id: &str) -> Result<PathBuf> {
        let point = self.mount_point(id);
        match std::fs::create_dir(&point) {
            Ok(()) => set_mode(&point, 0o755)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating {}", point.display()))(e)),
        }
        if is_mounted(&point)? {
            return Ok(point);
        }
        let image = self.image(id);
        run(
            "mount",
            &[
                "-o",
                "loop,nodev,nosuid,noatime",
                path_str(&image)?,
                path_str(&point)?,
            ],
        )
        .await?;
        Ok(point)
    }

    /// Unmounts and deletes `id`'s filesystem; absent is fine. The container
    /// must be gone first (a container keeps a filesystem it has, unmounted
    /// or not).
    pub async fn remove(&self, id: &str) -> Result<()> {
        let point = self.mount_point(id);
        if point.exists()
            && is_mounted(&point)?
            && run("umount", &[path_str(&point)?]).await.is_err()
        {
            // Busy (a host process inside it): detach it now, the kernel
            // frees it when the last user leaves.
            run("umount", &["-l", path_str(&point)?]).await?;
        }
        match std::fs::remove_dir(&point) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", point.display()))(e)),
        }
        match std::fs::remove_file(self.image(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing {}", self.image(id).display()))(e)),
        }
    }

    /// Bytes free for the images on the host's filesystem.
    fn free_bytes(&self) -> Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.images.as_os_str().as_bytes())
            .map_err(|e| io("the disks directory")(std::io::Error::other(e)))?;
        // SAFETY: statvfs into a zeroed buffer with a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io(format!("statvfs {}", self.images.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }

    /// The sandbox ids that have a filesystem here.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids = std::collections::BTreeSet::new();
        for dir in [&self.images, &self.mounts] {
            for entry in std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
                let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                ids.insert(name.trim_end_matches(".img").to_string());
            }
        }
        Ok(ids.into_iter().collect())
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::Io {
        what: format!("{}", p.display()),
        source: std::io::Error::other("the path is not UTF-8"),
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

/// Whether something is mounted exactly at `point` (per this process's
/// mountinfo, whose paths escape spaces and the like as octal).
fn is_mounted(point: &Path) -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo"))?;
    let want = path_str(point)?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == want))
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let n = d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(n).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(io(format!("running {program}")))?;
    if out.status.success() {
        return Ok(());
    }
    let output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(Error::Command {
        command: format!("{program} {}", args.join(" ")),
        output: if output.is_empty() {
            format!("{}", out.status)
        } else {
            output
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
