//! Snapshots of the workspace as tar archives, and restoring them.
//!
//! Restore does not trust the archive or any library's "safe unpack": it
//! walks the entries itself and creates each one beneath a fresh staging
//! directory, resolving parents with symlinks refused, so no entry can be
//! written through a link (one that was there, or one the archive created
//! earlier). Only when the whole archive was accepted is the staging
//! directory swapped in; a refused or truncated archive leaves the
//! workspace exactly as it was.

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::fs::resolve::cstring;
use crate::fs::{self, Workspace};

/// Names the agent uses for its own work inside a directory; never archived.
const STAGING_PREFIX: &str = ".bridle-restore-";
const TRASH_PREFIX: &str = ".bridle-trash-";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Fs(#[from] fs::Error),
    #[error("bad exclude pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("archive refused: entry {entry:?}: {reason}")]
    Refused { entry: String, reason: String },
    #[error("archive unreadable: {0}")]
    Corrupt(std::io::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn refuse(entry: &Path, reason: impl Into<String>) -> Error {
    Error::Refused {
        entry: entry.display().to_string(),
        reason: reason.into(),
    }
}

pub struct SnapshotOptions {
    pub path: String,
    pub exclude: Vec<String>,
    pub zstd_level: Option<i32>,
}

/// A snapshot whose directory is open and whose excludes are compiled: what
/// can be refused (a bad path or pattern) is refused by [`Snapshot::prepare`],
/// before any byte is written.
pub struct Snapshot {
    source: Source,
    globs: GlobSet,
    zstd_level: Option<i32>,
}

/// What a snapshot archives: a directory's tree, or one regular file (an
/// artifact such as `out/report.xml`), stored under its own name.
enum Source {
    Dir(OwnedFd),
    File {
        file: std::fs::File,
        name: std::ffi::OsString,
        st: libc::stat,
    },
}

impl Snapshot {
    pub fn prepare(ws: &Workspace, opts: &SnapshotOptions) -> Result<Self, Error> {
        let mut globs = GlobSetBuilder::new();
        for p in &opts.exclude {
            let g = Glob::new(p).map_err(|e| Error::BadPattern {
                pattern: p.clone(),
                reason: e.to_string(),
            })?;
            globs.add(g);
        }
        let globs = globs.build().map_err(|e| Error::BadPattern {
            pattern: opts.exclude.join(","),
            reason: e.to_string(),
        })?;
        let rel = ws.relative(&opts.path)?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer (it is then
        // refused below); it changes nothing for files and directories.
        let fd = ws.open(&rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
        let st = fs::fstat(fd.as_raw_fd(), &rel)?;
        let source = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Source::Dir(fd),
            libc::S_IFREG => Source::File {
                file: {
                    // SAFETY: F_SETFL on a valid fd: back to blocking reads.
                    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_RDONLY) };
                    std::fs::File::from(fd)
                },
                name: rel
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_else(|| "file".into()),
                st,
            },
            _ => {
                return Err(fs::Error::InvalidPath {
                    path: rel.display().to_string(),
                    reason: "is neither a directory nor a regular file",
                }
                .into())
            }
        };
        Ok(Self {
            source,
            globs,
            zstd_level: opts.zstd_level,
        })
    }

    /// Writes the tar (paths relative to the snapshot's directory) to `out`.
    pub fn write(self, out: impl Write) -> Result<(), Error> {
        match self.zstd_level {
            Some(level) => {
                let mut enc = zstd::Encoder::new(out, level).map_err(io("starting zstd"))?;
                write_tar(self.source, &self.globs, &mut enc)?;
                enc.finish().map_err(io("finishing zstd"))?;
            }
            None => write_tar(self.source, &self.globs, out)?,
        }
        Ok(())
    }
}

fn write_tar(source: Source, globs: &GlobSet, out: impl Write) -> Result<(), Error> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    match source {
        Source::Dir(dir) => add_dir(&mut b, dir, Path::new(""), globs, true)?,
        Source::File { file, name, st } => {
            let path = Path::new(&name);
            let size = st.st_size as u64;
            let mut h = header_for(&st, tar::EntryType::Regular, size);
            let body = ExactSize {
                inner: file,
                left: size,
            };
            b.append_data(&mut h, path, body)
                .map_err(io(format!("archiving {}", path.display())))?;
        }
    }
    b.into_inner()
        .map_err(io("finishing the archive"))?
        .flush()
        .map_err(io("flushing"))?;
    Ok(())
}

fn header_for(st: &libc::stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(st.st_uid as u64);
    h.set_gid(st.st_gid as u64);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(size);
    h
}

fn add_dir<W: Write>(
    b: &mut tar::Builder<W>,
    dir: OwnedFd,
    rel: &Path,
    globs: &GlobSet,
    top: bool,
) -> Result<(), Error> {
    let raw = dir.as_raw_fd();
    // SAFETY: F_DUPFD_CLOEXEC of a valid fd; read_dir_fd owns the dup.
    let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io("dup")(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    let entries = fs::read_dir_fd(unsafe { OwnedFd::from_raw_fd(dup) }, rel)?;
    for (name, _) in entries {
        let lossy = name.to_string_lossy();
        if top && (lossy.starts_with(STAGING_PREFIX) || lossy.starts_with(TRASH_PREFIX)) {
            continue;
        }
        let path = rel.join(&name);
        if globs.is_match(&path) {
            continue;
        }
        let c = cstring(&name)?;
        let st = match fs::lstat_at(raw, &c, &path) {
            Ok(st) => st,
            Err(fs::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let mut h = header_for(&st, tar::EntryType::Directory, 0);
                b.append_data(&mut h, &path, std::io::empty())
                    .map_err(io(format!("archiving {}", path.display())))?;
                let sub = fs::open_dir_at(raw, &c, &path)?;
                add_dir(b, sub, &path, globs, false)?;
            }
            libc::S_IFREG => {
                // SAFETY: openat on a valid dirfd and NUL-terminated name.
                let fd = unsafe {
                    libc::openat(
                        raw,
                        c.as_ptr(),
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(fs::Error::io(&path, std::io::Error::last_os_error()).into());
                }
                // SAFETY: a fresh fd we own.
                let file = unsafe { std::fs::File::from_raw_fd(fd) };
                let size = st.st_size as u64;
                let mut h = header_for(&st, tar::EntryType::Regular, size);
                // The header promises `size` bytes: a file that changes while
                // it is read is cut or zero-padded to that size.
                let body = ExactSize {
                    inner: file,
                    left: size,
                };
                b.append_data(&mut h, &path, body)
                    .map_err(io(format!("archiving {}", path.display())))?;
            }
            libc::S_IFLNK => {
                let target = crate::fs::resolve::readlink_at(raw, &c)
                    .map_err(io(format!("readlink {}", path.display())))?;
                let mut h = header_for(&st, tar::EntryType::Symlink, 0);
                b.append_link(&mut h, &path, Path::new(&target))
                    .map_err(io(format!("archiving {}", path.display())))?;
            }
            // Sockets, FIFOs and devices have no place in a snapshot.
            _ => {}
        }
    }
    Ok(())
}

struct ExactSize<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        let n = if n == 0 {
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreStats {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Detect,
}

/// Replaces the contents of directory `path` with the archive read from
/// `input`. On any error the directory is left as it was.
pub fn restore(
    ws: &Workspace,
    path: &str,
    compression: Compression,
    input: impl Read,
) -> Result<RestoreStats, Error> {
    let rel = ws.relative(path)?;
    let target = ws.open(&rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let staging_name = format!("{STAGING_PREFIX}{:016x}", fs::rand_u64());
    let staging_c = CString::new(staging_name.clone()).expect("no NUL");
    // SAFETY: mkdirat on a valid dirfd.
    if unsafe { libc::mkdirat(target.as_raw_fd(), staging_c.as_ptr(), 0o700) } < 0 {
        return Err(fs::Error::io(rel.join(&staging_name), std::io::Error::last_os_error()).into());
    }
    let result = (|| {
        let staging_fd = fs::open_dir_at(target.as_raw_fd(), &staging_c, &rel)?;
        let staging = Workspace::from_dir_fd(staging_fd)?.refusing_symlinks();
        let stats = unpack(&staging, compression, input)?;
        swap_in(target.as_raw_fd(), &staging_c)?;
        Ok(stats)
    })();
    // Whatever is left in staging (everything on failure, nothing on
    // success) goes.
    let _ = fs::remove_tree_at(target.as_raw_fd(), &staging_c, Path::new(&staging_name));
    result
}

fn unpack(
    staging: &Workspace,
    compression: Compression,
    input: impl Read,
) -> Result<RestoreStats, Error> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let zstd = match compression {
        Compression::Zstd => true,
        Compression::None => false,
        Compression::Detect => {
            use std::io::BufRead;
            let head = input.fill_buf().map_err(Error::Corrupt)?;
            head.starts_with(&ZSTD_MAGIC)
        }
    };
    if zstd {
        let dec = zstd::Decoder::with_buffer(input).map_err(Error::Corrupt)?;
        unpack_tar(staging, dec)
    } else {
        unpack_tar(staging, input)
    }
}

fn unpack_tar(staging: &Workspace, input: impl Read) -> Result<RestoreStats, Error> {
    let mut archive = tar::Archive::new(input);
    let mut stats = RestoreStats::default();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(Error::Corrupt)? {
        let mut entry = entry.map_err(Error::Corrupt)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let raw_path = entry.path_bytes().into_owned();
        let shown = PathBuf::from(OsStr::from_bytes(&raw_path));
        let rel = clean_entry_path(&shown)?;
        let mode = entry.header().mode().map_err(Error::Corrupt)?;
        if mode & 0o6000 != 0 {
            return Err(refuse(&shown, "setuid/setgid bits are not allowed"));
        }
        let Some(rel) = rel else {
            // "./" itself: the staging root.
            continue;
        };
        match kind {
            tar::EntryType::Directory => {
                let (dir, name) = staging.create_parents(&rel, 0o755)?;
                let c = cstring(&name)?;
                // SAFETY: mkdirat on a valid dirfd.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700) } < 0 {
                    let err = std::io::Error::last_os_error();
                    let st = fs::lstat_at(dir.as_raw_fd(), &c, &rel).ok();
                    let is_dir = st.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
                    if err.raw_os_error() != Some(libc::EEXIST) || !is_dir {
                        return Err(refuse(
                            &shown,
                            "a directory where something else already is",
                        ));
                    }
                }
                dir_modes.push((rel, mode & 0o1777));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let (dir, name) = staging.create_parents(&rel, 0o755)?;
                let c = cstring(&name)?;
                unlink_existing(dir.as_raw_fd(), &c, &shown)?;
                // SAFETY: openat on a valid dirfd; O_EXCL|O_NOFOLLOW never
                // follows or reuses whatever was there.
                let fd = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        c.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600 as libc::c_uint,
                    )
                };
                if fd < 0 {
                    return Err(fs::Error::io(&rel, std::io::Error::last_os_error()).into());
                }
                // SAFETY: a fresh fd we own.
                let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
                let n = std::io::copy(&mut entry, &mut file).map_err(Error::Corrupt)?;
                stats.bytes += n;
                // Permissions are set on the fd we wrote, never by path.
                // SAFETY: fchmod on a valid fd.
                unsafe { libc::fchmod(file.as_raw_fd(), mode & 0o777) };
                set_mtime(file.as_raw_fd(), entry.header().mtime().unwrap_or(0));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(&shown, "symlink without a target"))?
                    .into_owned();
                check_link_target(&rel, &target).map_err(|r| refuse(&shown, r))?;
                let (dir, name) = staging.create_parents(&rel, 0o755)?;
                let c = cstring(&name)?;
                unlink_existing(dir.as_raw_fd(), &c, &shown)?;
                let t = CString::new(target).map_err(|_| refuse(&shown, "NUL in link target"))?;
                // SAFETY: symlinkat with NUL-terminated strings and a valid dirfd.
                if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) } < 0 {
                    return Err(fs::Error::io(&rel, std::io::Error::last_os_error()).into());
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(&shown, "hard link without a target"))?
                    .into_owned();
                let target_rel = clean_entry_path(Path::new(OsStr::from_bytes(&target)))?
                    .ok_or_else(|| refuse(&shown, "hard link to the archive root"))?;
                // The target is resolved in staging with symlinks refused:
                // only a file this archive already created can be linked.
                let (tdir, tname) = staging
                    .open_parent(&target_rel)
                    .map_err(|e| refuse(&shown, format!("hard link target: {e}")))?;
                let tc = cstring(&tname)?;
                let tst = fs::lstat_at(tdir.as_raw_fd(), &tc, &target_rel)
                    .map_err(|e| refuse(&shown, format!("hard link target: {e}")))?;
                if tst.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(refuse(&shown, "hard links may only point at regular files"));
                }
                let (dir, name) = staging.create_parents(&rel, 0o755)?;
                let c = cstring(&name)?;
                unlink_existing(dir.as_raw_fd(), &c, &shown)?;
                // SAFETY: linkat between valid dirfds without following links.
                if unsafe {
                    libc::linkat(
                        tdir.as_raw_fd(),
                        tc.as_ptr(),
                        dir.as_raw_fd(),
                        c.as_ptr(),
                        0,
                    )
                } < 0
                {
                    return Err(fs::Error::io(&rel, std::io::Error::last_os_error()).into());
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse(&shown, "device nodes are not allowed"));
            }
            tar::EntryType::Fifo => return Err(refuse(&shown, "FIFOs are not allowed")),
            other => return Err(refuse(&shown, format!("unsupported entry type {other:?}"))),
        }
        stats.entries += 1;
    }
    // Directory modes last, deepest first, so a read-only directory does not
    // stop its own children from being created.
    dir_modes.sort_by(|a, b| b.0.cmp(&a.0));
    for (rel, mode) in dir_modes {
        let fd = staging.open(
            &rel,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        // SAFETY: fchmod on a valid fd.
        unsafe { libc::fchmod(fd.as_raw_fd(), mode) };
    }
    Ok(stats)
}

/// An entry path as plain components. `None` is the archive root ("./").
/// Absolute paths and `..` are refused outright, never rewritten.
fn clean_entry_path(p: &Path) -> Result<Option<PathBuf>, Error> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse(p, "`..` in an entry path")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(p, "absolute entry path"))
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// A symlink may point only at a place inside the archive root, judged
/// lexically from the link's own directory.
fn check_link_target(link: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty symlink target".into());
    }
    if target[0] == b'/' {
        return Err("absolute symlink target".into());
    }
    let mut depth: Vec<&OsStr> = link
        .parent()
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if depth.pop().is_none() {
                    return Err("symlink target leaves the archive".into());
                }
            }
            other => depth.push(OsStr::from_bytes(other)),
        }
    }
    Ok(())
}

fn unlink_existing(dir: RawFd, name: &std::ffi::CStr, shown: &Path) -> Result<(), Error> {
    match fs::lstat_at(dir, name, shown) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
            Err(refuse(shown, "a file where a directory already is"))
        }
        Ok(_) => {
            // SAFETY: unlinkat on a valid dirfd.
            unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

fn set_mtime(fd: RawFd, mtime: u64) {
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime as libc::time_t,
            tv_nsec: 0,
        },
    ];
    // SAFETY: futimens on a valid fd with two timespecs.
    unsafe { libc::futimens(fd, ts.as_ptr()) };
}

/// Moves the target's current entries into a trash directory, the staged
/// ones into the target, then deletes the trash. A failure part-way moves
/// everything back.
fn swap_in(target: RawFd, staging: &std::ffi::CStr) -> Result<(), Error> {
    let trash_name = format!("{TRASH_PREFIX}{:016x}", fs::rand_u64());
    let trash = CString::new(trash_name.clone()).expect("no NUL");
    // SAFETY: mkdirat on a valid dirfd.
    if unsafe { libc::mkdirat(target, trash.as_ptr(), 0o700) } < 0 {
        return Err(io("creating the trash directory")(
            std::io::Error::last_os_error(),
        ));
    }
    let list = |fd: RawFd| -> Result<Vec<OsString>, Error> {
        // SAFETY: F_DUPFD_CLOEXEC of a valid fd.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io("dup")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we own.
        Ok(
            fs::read_dir_fd(unsafe { OwnedFd::from_raw_fd(dup) }, Path::new("."))?
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
        )
    };
    let trash_fd = fs::open_dir_at(target, &trash, Path::new(&trash_name))?;
    let staging_fd = fs::open_dir_at(target, staging, Path::new("staging"))?;
    let is_ours = |n: &OsStr| {
        let s = n.to_string_lossy();
        s.starts_with(STAGING_PREFIX) || s.starts_with(TRASH_PREFIX)
    };
    let mv = |from: RawFd, to: RawFd, name: &OsStr| -> std::io::Result<()> {
        let c = CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: renameat between valid dirfds.
        if unsafe { libc::renameat(from, c.as_ptr(), to, c.as_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let old: Vec<OsString> = list(target)?.into_iter().filter(|n| !is_ours(n)).collect();
    let mut moved_old = Vec::new();
    let mut moved_new = Vec::new();
    let result = (|| -> std::io::Result<()> {
        for n in &old {
            mv(target, trash_fd.as_raw_fd(), n)?;
            moved_old.push(n.clone());
        }
        for n in list(staging_fd.as_raw_fd()).map_err(|e| std::io::Error::other(e.to_string()))? {
            mv(staging_fd.as_raw_fd(), target, &n)?;
            moved_new.push(n);
        }
        Ok(())
    })();
    if let Err(e) = result {
        for n in moved_new.iter().rev() {
            let _ = mv(target, staging_fd.as_raw_fd(), n);
        }
        for n in moved_old.iter().rev() {
            let _ = mv(trash_fd.as_raw_fd(), target, n);
        }
        let _ = fs::remove_tree_at(target, &trash, Path::new(&trash_name));
        return Err(io("swapping the restored tree in")(e));
    }
    drop(trash_fd);
    fs::remove_tree_at(target, &trash, Path::new(&trash_name))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bridle_tests::tarcraft::{build, Entry, Kind};
    use proptest::prelude::*;

    use super::*;

    /// Path → description of everything under `dir`, not following links.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = std::fs::symlink_metadata(&p).unwrap();
                use std::os::unix::fs::PermissionsExt;
                let mode = md.permissions().mode() & 0o7777;
                let desc = if md.is_symlink() {
                    format!("link {:?}", std::fs::read_link(&p).unwrap())
                } else if md.is_dir() {
                    stack.push(p.clone());
                    format!("dir {mode:o}")
                } else {
                    format!("file {mode:o} {:?}", std::fs::read(&p).unwrap())
                };
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), desc);
            }
        }
        out
    }

    /// A jail holding a workspace with some content, and a sentinel next to
    /// it that no archive may touch.
    struct Jail {
        dir: tempfile::TempDir,
    }

    impl Jail {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("ws/keep")).unwrap();
            std::fs::write(dir.path().join("ws/keep/f"), b"original").unwrap();
            std::fs::write(dir.path().join("sentinel"), b"untouched").unwrap();
            Self { dir }
        }
        fn ws_path(&self) -> PathBuf {
            self.dir.path().join("ws")
        }
        fn restore(&self, archive: &[u8]) -> Result<RestoreStats, Error> {
            let ws = Workspace::at(&self.ws_path()).unwrap();
            restore(&ws, "", Compression::Detect, archive)
        }
        /// Everything outside the workspace is as it was.
        fn outside_intact(&self) {
            let mut outside = tree(self.dir.path());
            outside.retain(|p, _| !p.starts_with("ws"));
            let expected: BTreeMap<PathBuf, String> = [(
                PathBuf::from("sentinel"),
                format!("file 644 {:?}", b"untouched"),
            )]
            .into();
            assert_eq!(outside, expected);
        }
    }

    fn assert_refused(entries: &[Entry], why: &str) {
        let jail = Jail::new();
        let before = tree(&jail.ws_path());
        let res = jail.restore(&build(entries));
        assert!(
            matches!(
                res,
                Err(Error::Refused { .. }) | Err(Error::Corrupt(_)) | Err(Error::Fs(_))
            ),
            "{why}: {res:?}"
        );
        assert_eq!(tree(&jail.ws_path()), before, "{why}: workspace changed");
        jail.outside_intact();
    }

    #[test]
    fn a_good_archive_replaces_the_workspace() {
        let jail = Jail::new();
        let stats = jail
            .restore(&build(&[
                Entry::dir("a"),
                Entry::file("a/x", b"hello"),
                Entry::symlink("a/l", "x"),
                Entry::hardlink("a/h", "a/x"),
                Entry::dir("ro").with_mode(0o555),
                Entry::file("ro/inside", b"1"),
            ]))
            .unwrap();
        assert_eq!(stats.entries, 6);
        let t = tree(&jail.ws_path());
        let names: Vec<_> = t.keys().map(|p| p.display().to_string()).collect();
        assert_eq!(names, ["a", "a/h", "a/l", "a/x", "ro", "ro/inside"]);
        assert_eq!(t[Path::new("ro")], "dir 555");
        jail.outside_intact();
    }

    #[test]
    fn paths_that_leave_are_refused() {
        assert_refused(&[Entry::file("../evil", b"x")], "dotdot");
        assert_refused(&[Entry::file("a/../../evil", b"x")], "nested dotdot");
        assert_refused(&[Entry::file("/abs", b"x")], "absolute");
        assert_refused(&[Entry::symlink("l", "/etc")], "absolute symlink");
        assert_refused(
            &[Entry::symlink("a/l", "../../sentinel")],
            "relative symlink out",
        );
        assert_refused(&[Entry::hardlink("h", "../sentinel")], "hard link out");
        assert_refused(&[Entry::hardlink("h", "/etc/passwd")], "absolute hard link");
    }

    #[test]
    fn special_files_and_privilege_bits_are_refused() {
        assert_refused(
            &[Entry::file("dev", b"").with_kind(Kind::CharDevice)],
            "char device",
        );
        assert_refused(&[Entry::file("fifo", b"").with_kind(Kind::Fifo)], "fifo");
        assert_refused(&[Entry::file("suid", b"x").with_mode(0o4755)], "setuid");
        assert_refused(&[Entry::dir("sgid").with_mode(0o2755)], "setgid dir");
    }

    // Regression cases from the tar crate's advisories, ported.

    #[test]
    fn symlink_then_file_through_it() {
        // The link stays inside, but an archive must not write through a
        // link it created: that is how "inside" links get retargeted later.
        assert_refused(
            &[
                Entry::dir("sub"),
                Entry::symlink("link", "sub"),
                Entry::file("link/evil", b"x"),
            ],
            "write through own link",
        );
        assert_refused(
            &[
                Entry::symlink("link", "."),
                Entry::file("link/link/x", b"x"),
            ],
            "self link",
        );
    }

    #[test]
    fn link_then_overwrite_does_not_write_through_the_link() {
        let jail = Jail::new();
        jail.restore(&build(&[
            Entry::file("f", b"first"),
            Entry::hardlink("h", "f"),
            Entry::file("h", b"second"),
        ]))
        .unwrap();
        assert_eq!(std::fs::read(jail.ws_path().join("f")).unwrap(), b"first");
        assert_eq!(std::fs::read(jail.ws_path().join("h")).unwrap(), b"second");
        jail.outside_intact();
    }

    #[test]
    fn chmod_through_a_symlink_is_refused() {
        assert_refused(
            &[
                Entry::file("f", b"x"),
                Entry::symlink("l", "f"),
                Entry::dir("l").with_mode(0o777),
            ],
            "dir over symlink",
        );
    }

    #[test]
    fn pax_and_ustar_size_disagreement_cannot_smuggle_an_entry() {
        // The ustar size covers a hidden header for ../evil; the PAX size
        // says the file is empty. A reader that honours PAX (tar >= 0.4.45)
        // then meets the hidden header and refuses it; one that does not
        // would have skipped it. Either way nothing may land outside.
        let hidden = build(&[Entry::file("../evil", b"pwned")]);
        let mut carrier = Entry::file("carrier", &hidden[..hidden.len() - 1024]);
        carrier.pax_size = Some(0);
        assert_refused(&[carrier], "pax size 0 hiding an entry");
    }

    #[test]
    fn truncated_or_garbage_archives_change_nothing() {
        let good = build(&[Entry::dir("a"), Entry::file("a/x", &[7u8; 5000])]);
        for cut in [10, 600, 3000] {
            assert_refused_raw(&good[..cut], &format!("cut at {cut}"));
        }
        assert_refused_raw(
            b"this is not a tar archive at all, not even close.......",
            "garbage",
        );
        assert_refused_raw(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], "broken zstd");
    }

    fn assert_refused_raw(bytes: &[u8], why: &str) {
        let jail = Jail::new();
        let before = tree(&jail.ws_path());
        let res = jail.restore(bytes);
        assert!(res.is_err(), "{why}: accepted");
        assert_eq!(tree(&jail.ws_path()), before, "{why}: workspace changed");
        jail.outside_intact();
    }

    #[test]
    fn snapshot_restore_is_identity() {
        let src = Jail::new();
        let ws = src.ws_path();
        std::fs::create_dir_all(ws.join("d/e")).unwrap();
        std::fs::write(ws.join("d/e/big"), vec![42u8; 3 << 20]).unwrap();
        std::os::unix::fs::symlink("e/big", ws.join("d/link")).unwrap();
        std::fs::write(ws.join("excluded.log"), b"x").unwrap();
        let w = Workspace::at(&ws).unwrap();
        for level in [None, Some(3)] {
            let mut archive = Vec::new();
            let opts = SnapshotOptions {
                path: String::new(),
                exclude: vec!["*.log".into()],
                zstd_level: level,
            };
            Snapshot::prepare(&w, &opts)
                .unwrap()
                .write(&mut archive)
                .unwrap();
            let dst = Jail::new();
            dst.restore(&archive).unwrap();
            let mut expected = tree(&ws);
            expected.remove(Path::new("excluded.log"));
            assert_eq!(tree(&dst.ws_path()), expected);
        }
    }

    #[test]
    fn a_single_file_is_archived_under_its_name_and_other_kinds_are_refused() {
        let src = Jail::new();
        let ws = src.ws_path();
        std::fs::create_dir_all(ws.join("out")).unwrap();
        std::fs::write(ws.join("out/report.xml"), b"<ok/>").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", ws.join("out/escape")).unwrap();
        let w = Workspace::at(&ws).unwrap();
        let snap = |path: &str| {
            let opts = SnapshotOptions {
                path: path.into(),
                exclude: vec![],
                zstd_level: None,
            };
            let mut archive = Vec::new();
            Snapshot::prepare(&w, &opts)?.write(&mut archive)?;
            Ok::<_, Error>(archive)
        };
        let archive = snap("out/report.xml").unwrap();
        let dst = Jail::new();
        dst.restore(&archive).unwrap();
        assert_eq!(
            std::fs::read(dst.ws_path().join("report.xml")).unwrap(),
            b"<ok/>"
        );
        // A link out of the workspace is not followed, and a FIFO does not
        // hang the agent.
        assert!(snap("out/escape").is_err());
        let fifo =
            std::ffi::CString::new(ws.join("out/fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = snap("out/fifo").unwrap_err().to_string();
        assert!(e.contains("neither a directory nor a regular file"), "{e}");
    }

    fn arb_name() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("keep".to_string()),
            Just("".to_string()),
        ];
        (prop::bool::weighted(0.1), prop::collection::vec(part, 1..4)).prop_map(|(abs, parts)| {
            let p = parts.join("/");
            if abs {
                format!("/{p}")
            } else {
                p
            }
        })
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            arb_name(),
            prop_oneof![
                Just(Kind::File),
                Just(Kind::Dir),
                Just(Kind::Symlink),
                Just(Kind::Hardlink),
                Just(Kind::Fifo)
            ],
            arb_name(),
            prop_oneof![Just(0o644u32), Just(0o755), Just(0o4755), Just(0o000)],
        )
            .prop_map(|(name, kind, link, mode)| {
                let mut e = Entry::file(&name, name.as_bytes())
                    .with_kind(kind)
                    .with_mode(mode);
                e.link = link.into_bytes();
                e
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever the archive holds, nothing outside the workspace changes,
        /// and a refused archive leaves the workspace exactly as it was.
        #[test]
        fn restore_never_escapes_and_fails_atomically(entries in prop::collection::vec(arb_entry(), 1..8)) {
            let jail = Jail::new();
            let before = tree(&jail.ws_path());
            let res = jail.restore(&build(&entries));
            if res.is_err() {
                prop_assert_eq!(tree(&jail.ws_path()), before);
            }
            jail.outside_intact();
            // Nothing of the agent's own work is left behind.
            for name in std::fs::read_dir(jail.ws_path()).unwrap() {
                let name = name.unwrap().file_name().to_string_lossy().into_owned();
                prop_assert!(!name.starts_with(STAGING_PREFIX) && !name.starts_with(TRASH_PREFIX));
            }
        }
    }
}
