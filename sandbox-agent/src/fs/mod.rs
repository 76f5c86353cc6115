//! File operations confined to the workspace. Every function here works on
//! fds obtained through [`resolve::Workspace`]; none re-joins a path string.

pub mod resolve;

use std::ffi::{CStr, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use resolve::Workspace;
use resolve::{cstring, readlink_at, unsafe_zeroed_stat};

/// How many entries one ListDir answers at most.
pub const LIST_CAP: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: resolves outside the workspace (`..` above the root, an absolute symlink, or a link that leaves it)")]
    Escapes { path: String },
    #[error(
        "{path}: too many levels of symbolic links, or a /proc magic link, which is never followed"
    )]
    SymlinkLoop { path: String },
    #[error("{path}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path}: already exists")]
    AlreadyExists { path: String },
    #[error("{path}: permission denied")]
    PermissionDenied { path: String },
    #[error("{path}: is a directory")]
    IsDirectory { path: String },
    #[error("{path}: a component is not a directory")]
    NotDirectory { path: String },
    #[error("{path}: directory not empty (use recursive)")]
    NotEmpty { path: String },
    #[error("{path}: {reason}; the destination was left as it was")]
    Incomplete { path: String, reason: String },
    #[error("{path}: no space left in the workspace (its disk limit)")]
    NoSpace { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl Error {
    /// Classifies an errno from resolving or operating on `path`.
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        let path = path.as_ref().display().to_string();
        match err.raw_os_error() {
            Some(libc::ENOENT) => Error::NotFound { path },
            Some(libc::EXDEV) => Error::Escapes { path },
            Some(libc::ELOOP) => Error::SymlinkLoop { path },
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                Error::PermissionDenied { path }
            }
            Some(libc::EEXIST) => Error::AlreadyExists { path },
            Some(libc::EISDIR) => Error::IsDirectory { path },
            Some(libc::ENOTDIR) => Error::NotDirectory { path },
            Some(libc::ENOTEMPTY) => Error::NotEmpty { path },
            Some(libc::ENAMETOOLONG) => Error::InvalidPath {
                path: truncated(path),
                reason: "path or name too long",
            },
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace { path },
            _ => Error::Io { path, source: err },
        }
    }
}

/// A path cut to a length fit for an error message.
fn truncated(mut path: String) -> String {
    const MAX: usize = 256;
    if path.len() > MAX {
        let mut cut = MAX;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
        path.push('…');
    }
    path
}

fn last_err(path: &Path) -> Error {
    Error::io(path, std::io::Error::last_os_error())
}

fn check(rc: libc::c_int, path: &Path) -> Result<(), Error> {
    if rc < 0 {
        Err(last_err(path))
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    File,
    Directory,
    Symlink,
    Other,
}

#[derive(Debug, Clone)]
pub struct FileInfo {
    pub path: PathBuf,
    pub name: OsString,
    pub file_type: FileType,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix_ms: i64,
    pub uid: u32,
    pub gid: u32,
    pub symlink_target: Option<OsString>,
}

fn file_type(mode: libc::mode_t) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FileType::File,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    }
}

fn info_from(rel: &Path, name: &OsStr, st: &libc::stat, target: Option<OsString>) -> FileInfo {
    FileInfo {
        path: rel.to_path_buf(),
        name: name.to_os_string(),
        file_type: file_type(st.st_mode),
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        mtime_unix_ms: st.st_mtime * 1000 + st.st_mtime_nsec / 1_000_000,
        uid: st.st_uid,
        gid: st.st_gid,
        symlink_target: target,
    }
}

/// lstat(2) of `name` in `dir`.
pub(crate) fn lstat_at(dir: RawFd, name: &CStr, path: &Path) -> Result<libc::stat, Error> {
    let mut st = unsafe_zeroed_stat();
    check(
        // SAFETY: valid dirfd, NUL-terminated name and a valid out struct.
        unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) },
        path,
    )?;
    Ok(st)
}

pub(crate) fn fstat(fd: RawFd, path: &Path) -> Result<libc::stat, Error> {
    let mut st = unsafe_zeroed_stat();
    // SAFETY: valid fd and out struct.
    check(unsafe { libc::fstat(fd, &mut st) }, path)?;
    Ok(st)
}

/// Stat without following a final symlink; the root itself is "".
pub fn stat(ws: &Workspace, path: &str) -> Result<FileInfo, Error> {
    let rel = ws.relative(path)?;
    if rel == Path::new(".") {
        let st = fstat(ws.root_fd().as_raw_fd(), &rel)?;
        return Ok(info_from(Path::new(""), OsStr::new(""), &st, None));
    }
    let (dir, name) = ws.open_parent(&rel)?;
    let c = cstring(&name)?;
    let st = lstat_at(dir.as_raw_fd(), &c, &rel)?;
    let target = if file_type(st.st_mode) == FileType::Symlink {
        Some(readlink_at(dir.as_raw_fd(), &c).map_err(|e| Error::io(&rel, e))?)
    } else {
        None
    };
    Ok(info_from(&rel, &name, &st, target))
}

/// Opens a regular file for reading; returns it with its size.
pub fn open_read(ws: &Workspace, path: &str) -> Result<(std::fs::File, u64), Error> {
    let rel = ws.relative(path)?;
    // O_NONBLOCK so that opening a FIFO cannot hang the agent; cleared below.
    let fd = ws.open(&rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
    let st = fstat(fd.as_raw_fd(), &rel)?;
    match file_type(st.st_mode) {
        FileType::File => {}
        FileType::Directory => return Err(Error::IsDirectory { path: path.into() }),
        _ => {
            return Err(Error::InvalidPath {
                path: path.into(),
                reason: "not a regular file",
            })
        }
    }
    // SAFETY: F_SETFL on a valid fd.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_RDONLY) };
    Ok((std::fs::File::from(fd), st.st_size as u64))
}

#[derive(Default)]
pub struct WriteOptions {
    pub mode: u32,
    pub create_parents: bool,
    pub no_overwrite: bool,
    pub sync: bool,
    /// Commit only if exactly this many bytes were written.
    pub expect_size: Option<u64>,
    /// Commit only if what was written has this sha256 (lowercase hex).
    pub expect_sha256: Option<String>,
}

/// A file being written: data goes to a temporary file next to the target,
/// which is renamed over the target only by [`AtomicWrite::commit`]. Dropping
/// it without committing removes the temporary file.
pub struct AtomicWrite {
    dir: OwnedFd,
    tmp_name: std::ffi::CString,
    name: std::ffi::CString,
    rel: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    hasher: Hasher,
    size: u64,
    opts: WriteOptions,
}

const SPECIAL_BITS: u32 = 0o7000;

/// Uploads larger than this hash on a second thread.
const HASH_THREAD_AFTER: u64 = 4 << 20;

enum Hasher {
    Inline(Sha256),
    Threaded {
        tx: std::sync::mpsc::SyncSender<bytes::Bytes>,
        done: std::thread::JoinHandle<Sha256>,
    },
}

impl Hasher {
    fn update(&mut self, data: bytes::Bytes, threaded: bool) {
        if let Hasher::Inline(h) = self {
            if !threaded {
                h.update(&data);
                return;
            }
            // Hand the running state to a thread; a bounded channel keeps it
            // at most a few chunks behind the writer.
            let mut state = h.clone();
            let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(4);
            let spawned = std::thread::Builder::new()
                .name("upload-sha256".into())
                .spawn(move || {
                    for chunk in rx {
                        state.update(&chunk);
                    }
                    state
                });
            // No thread to be had: keep hashing inline.
            if let Ok(done) = spawned {
                *self = Hasher::Threaded { tx, done };
            }
        }
        match self {
            Hasher::Inline(h) => h.update(&data),
            Hasher::Threaded { tx, .. } => {
                // The thread only stops when `tx` is dropped.
                let _ = tx.send(data);
            }
        }
    }

    fn finish(self) -> sha2::digest::Output<Sha256> {
        match self {
            Hasher::Inline(h) => h.finalize(),
            Hasher::Threaded { tx, done } => {
                drop(tx);
                done.join()
                    .expect("the hashing thread does not panic")
                    .finalize()
            }
        }
    }
}

impl AtomicWrite {
    pub fn begin(ws: &Workspace, path: &str, opts: WriteOptions) -> Result<Self, Error> {
        let rel = ws.relative(path)?;
        if opts.mode & SPECIAL_BITS != 0 {
            return Err(Error::InvalidPath {
                path: path.into(),
                reason: "setuid, setgid and sticky bits are not allowed",
            });
        }
        let (dir, name) = if opts.create_parents {
            ws.create_parents(&rel, 0o755)?
        } else {
            ws.open_parent(&rel)?
        };
        let c_name = cstring(&name)?;
        if let Ok(st) = lstat_at(dir.as_raw_fd(), &c_name, &rel) {
            if file_type(st.st_mode) == FileType::Directory {
                return Err(Error::IsDirectory { path: path.into() });
            }
            if opts.no_overwrite {
                return Err(Error::AlreadyExists { path: path.into() });
            }
        }
        let mut tmp = OsString::from(".");
        tmp.push(&name);
        tmp.push(format!(".bridle-{:016x}", rand_u64()));
        let tmp_name = cstring(&tmp)?;
        // SAFETY: openat on a valid dirfd with a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                tmp_name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(last_err(&rel));
        }
        // SAFETY: a new fd we now own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        Ok(Self {
            dir,
            tmp_name,
            name: c_name,
            rel,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            hasher: Hasher::Inline(Sha256::new()),
            size: 0,
            opts,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.write_bytes(bytes::Bytes::copy_from_slice(data))
    }

    /// Writes a chunk. Past the first chunk, hashing moves to a thread of
    /// its own so that it overlaps with writing.
    pub fn write_bytes(&mut self, data: bytes::Bytes) -> Result<(), Error> {
        let file = self.file.as_mut().expect("not committed");
        file.write_all(&data).map_err(|e| Error::io(&self.rel, e))?;
        self.size += data.len() as u64;
        self.hasher.update(data, self.size > HASH_THREAD_AFTER);
        Ok(())
    }

    /// Renames the data into place and returns (size, sha256 hex); when the
    /// data is not what [`WriteOptions`] announced, removes it instead and
    /// leaves the destination as it was.
    pub fn commit(mut self) -> Result<(u64, String), Error> {
        let digest = hex::encode(
            std::mem::replace(&mut self.hasher, Hasher::Inline(Sha256::new())).finish(),
        );
        let incomplete = |reason: String| Error::Incomplete {
            path: self.rel.display().to_string(),
            reason,
        };
        if let Some(expected) = self.opts.expect_size {
            if expected != self.size {
                return Err(incomplete(format!(
                    "{} bytes arrived and {expected} were announced",
                    self.size
                )));
            }
        }
        if let Some(expected) = &self.opts.expect_sha256 {
            if !expected.eq_ignore_ascii_case(&digest) {
                return Err(incomplete(format!(
                    "what arrived has sha256 {digest} and {expected} was announced"
                )));
            }
        }
        let file = self.file.take().expect("not committed");
        let file = file
            .into_inner()
            .map_err(|e| Error::io(&self.rel, e.into_error()))?;
        let mode = if self.opts.mode == 0 {
            0o644
        } else {
            self.opts.mode & 0o777
        };
        // SAFETY: fchmod on a valid fd.
        check(unsafe { libc::fchmod(file.as_raw_fd(), mode) }, &self.rel)?;
        if self.opts.sync {
            file.sync_all().map_err(|e| Error::io(&self.rel, e))?;
        }
        drop(file);
        let flags = if self.opts.no_overwrite {
            libc::RENAME_NOREPLACE
        } else {
            0
        };
        // SAFETY: renameat2 within one valid dirfd and NUL-terminated names.
        let rc = unsafe {
            libc::renameat2(
                self.dir.as_raw_fd(),
                self.tmp_name.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                flags,
            )
        };
        check(rc, &self.rel)?;
        if self.opts.sync {
            sync_dir(self.dir.as_raw_fd());
        }
        // Renamed: nothing left for Drop to clean up.
        self.tmp_name = std::ffi::CString::default();
        Ok((self.size, digest))
    }
}

impl Drop for AtomicWrite {
    fn drop(&mut self) {
        if !self.tmp_name.as_bytes().is_empty() {
            // SAFETY: unlinkat on a valid dirfd and NUL-terminated name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp_name.as_ptr(), 0) };
        }
    }
}

fn sync_dir(dir: RawFd) {
    // SAFETY: open "." relative to a valid dirfd; the fd is closed below.
    let fd = unsafe {
        libc::openat(
            dir,
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: valid fd, closed right after.
        unsafe {
            libc::fsync(fd);
            libc::close(fd);
        }
    }
}

pub(crate) fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a valid 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        // getrandom never fails for 8 bytes once the pool is ready; fall back
        // to the clock rather than fail a write over a temp-file name.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (std::process::id() as u64) << 32;
    }
    u64::from_ne_bytes(b)
}

/// Entries of a directory fd (consumed), without "." and "..".
pub(crate) fn read_dir_fd(fd: OwnedFd, path: &Path) -> Result<Vec<(OsString, u8)>, Error> {
    let raw = fd.as_raw_fd();
    // SAFETY: fdopendir takes ownership of the fd on success.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        return Err(last_err(path));
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    loop {
        // SAFETY: dirp is a valid DIR*; readdir returns null at the end.
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the dirent.
        let (name, d_type) = unsafe { (CStr::from_ptr((*ent).d_name.as_ptr()), (*ent).d_type) };
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        out.push((OsStr::from_bytes(bytes).to_os_string(), d_type));
    }
    // SAFETY: closes the DIR* and the fd it owns.
    unsafe { libc::closedir(dirp) };
    out.sort();
    Ok(out)
}

/// Opens `name` in `dir` as a directory without following a symlink.
pub(crate) fn open_dir_at(dir: RawFd, name: &CStr, path: &Path) -> Result<OwnedFd, Error> {
    // SAFETY: openat on a valid dirfd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_err(path));
    }
    // SAFETY: a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Lists a directory to `depth` levels (1 = its own entries). Symlinks are
/// listed, never descended into.
pub fn list_dir(ws: &Workspace, path: &str, depth: u32) -> Result<(Vec<FileInfo>, bool), Error> {
    let rel = ws.relative(path)?;
    let fd = ws.open(&rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let base = if rel == Path::new(".") {
        PathBuf::new()
    } else {
        rel.clone()
    };
    let mut out = Vec::new();
    let truncated = list_into(fd, &base, depth.max(1), &mut out)?;
    Ok((out, truncated))
}

fn list_into(
    dir: OwnedFd,
    base: &Path,
    depth: u32,
    out: &mut Vec<FileInfo>,
) -> Result<bool, Error> {
    let dir_raw = dir.as_raw_fd();
    // read_dir_fd consumes its fd; keep `dir` for the *at calls below.
    // SAFETY: F_DUPFD_CLOEXEC of a valid fd.
    let dup = unsafe { libc::fcntl(dir_raw, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(last_err(base));
    }
    // SAFETY: a new fd we own.
    let entries = read_dir_fd(unsafe { OwnedFd::from_raw_fd(dup) }, base)?;
    for (name, _) in entries {
        if out.len() >= LIST_CAP {
            return Ok(true);
        }
        let c = cstring(&name)?;
        let rel = base.join(&name);
        let st = match lstat_at(dir_raw, &c, &rel) {
            Ok(st) => st,
            // Removed while we listed: not an error for a listing.
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let ft = file_type(st.st_mode);
        let target = if ft == FileType::Symlink {
            readlink_at(dir_raw, &c).ok()
        } else {
            None
        };
        out.push(info_from(&rel, &name, &st, target));
        if ft == FileType::Directory && depth > 1 {
            if let Ok(sub) = open_dir_at(dir_raw, &c, &rel) {
                if list_into(sub, &rel, depth - 1, out)? {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

pub fn make_dir(ws: &Workspace, path: &str, parents: bool, mode: u32) -> Result<(), Error> {
    let rel = ws.relative(path)?;
    let mode = if mode == 0 { 0o755 } else { mode & 0o777 };
    let (dir, name) = if parents {
        match ws.create_parents(&rel, 0o755) {
            Ok(v) => v,
            // `mkdir -p` of the root, or of a path that ends in `.`: only
            // fine if it already is a directory.
            Err(Error::InvalidPath { .. }) => {
                ws.open(&rel, libc::O_PATH | libc::O_DIRECTORY, 0)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    } else {
        ws.open_parent(&rel)?
    };
    let c = cstring(&name)?;
    // SAFETY: mkdirat on a valid dirfd and NUL-terminated name.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if parents && err.raw_os_error() == Some(libc::EEXIST) {
            let st = lstat_at(dir.as_raw_fd(), &c, &rel)?;
            if file_type(st.st_mode) == FileType::Directory {
                return Ok(());
            }
        }
        return Err(Error::io(&rel, err));
    }
    Ok(())
}

pub fn remove(ws: &Workspace, path: &str, recursive: bool) -> Result<(), Error> {
    let rel = ws.relative(path)?;
    let (dir, name) = ws.open_parent(&rel)?;
    let c = cstring(&name)?;
    let st = lstat_at(dir.as_raw_fd(), &c, &rel)?;
    if file_type(st.st_mode) == FileType::Directory {
        if recursive {
            remove_tree_at(dir.as_raw_fd(), &c, &rel)
        } else {
            // SAFETY: unlinkat on a valid dirfd and NUL-terminated name.
            check(
                unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) },
                &rel,
            )
        }
    } else {
        // SAFETY: as above.
        check(
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) },
            &rel,
        )
    }
}

/// Removes directory `name` in `dir` and everything beneath it, never
/// following a symlink.
pub(crate) fn remove_tree_at(dir: RawFd, name: &CStr, path: &Path) -> Result<(), Error> {
    let sub = open_dir_at(dir, name, path)?;
    let sub_raw = sub.as_raw_fd();
    // SAFETY: F_DUPFD_CLOEXEC of a valid fd.
    let dup = unsafe { libc::fcntl(sub_raw, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(last_err(path));
    }
    // SAFETY: a new fd we own.
    for (child, d_type) in read_dir_fd(unsafe { OwnedFd::from_raw_fd(dup) }, path)? {
        let c = cstring(&child)?;
        let child_path = path.join(&child);
        let is_dir = if d_type == libc::DT_UNKNOWN {
            file_type(lstat_at(sub_raw, &c, &child_path)?.st_mode) == FileType::Directory
        } else {
            d_type == libc::DT_DIR
        };
        if is_dir {
            remove_tree_at(sub_raw, &c, &child_path)?;
        } else {
            check(
                // SAFETY: unlinkat on a valid dirfd and NUL-terminated name.
                unsafe { libc::unlinkat(sub_raw, c.as_ptr(), 0) },
                &child_path,
            )?;
        }
    }
    drop(sub);
    // SAFETY: as above.
    check(
        unsafe { libc::unlinkat(dir, name.as_ptr(), libc::AT_REMOVEDIR) },
        path,
    )
}

pub fn rename(ws: &Workspace, from: &str, to: &str, overwrite: bool) -> Result<(), Error> {
    let from_rel = ws.relative(from)?;
    let to_rel = ws.relative(to)?;
    let (from_dir, from_name) = ws.open_parent(&from_rel)?;
    let (to_dir, to_name) = ws.open_parent(&to_rel)?;
    let (fc, tc) = (cstring(&from_name)?, cstring(&to_name)?);
    let flags = if overwrite { 0 } else { libc::RENAME_NOREPLACE };
    // SAFETY: renameat2 on valid dirfds and NUL-terminated names.
    let rc = unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            fc.as_ptr(),
            to_dir.as_raw_fd(),
            tc.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Error::AlreadyExists { path: to.into() },
            Some(libc::ENOENT) => Error::NotFound { path: from.into() },
            _ => Error::io(&to_rel, err),
        });
    }
    Ok(())
}

/// Reads `length` bytes (0 = to the end) from `offset`, calling `sink` with
/// chunks of at most `chunk` bytes.
pub fn read_range(
    mut file: std::fs::File,
    offset: u64,
    length: u64,
    chunk: usize,
    mut sink: impl FnMut(u64, Vec<u8>) -> bool,
) -> std::io::Result<()> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut remaining = if length == 0 { u64::MAX } else { length };
    let mut pos = offset;
    while remaining > 0 {
        let want = remaining.min(chunk as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        remaining -= filled as u64;
        let len = filled as u64;
        if !sink(pos, buf) {
            break;
        }
        pos += len;
        if (filled) < want {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws() -> (tempfile::TempDir, Workspace) {
        let t = tempfile::tempdir().unwrap();
        let w = Workspace::at(t.path()).unwrap();
        (t, w)
    }

    fn opts() -> WriteOptions {
        WriteOptions {
            create_parents: true,
            ..Default::default()
        }
    }

    #[test]
    fn write_is_atomic_and_hashed() {
        let (t, ws) = ws();
        let mut w = AtomicWrite::begin(&ws, "a/b/c.txt", opts()).unwrap();
        w.write(b"hello ").unwrap();
        // Nothing visible under the final name until commit.
        assert!(!t.path().join("a/b/c.txt").exists());
        w.write(b"world").unwrap();
        let (size, sha) = w.commit().unwrap();
        assert_eq!(size, 11);
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(
            std::fs::read(t.path().join("a/b/c.txt")).unwrap(),
            b"hello world"
        );
        let left: Vec<_> = std::fs::read_dir(t.path().join("a/b")).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
    }

    #[test]
    fn a_write_that_is_not_what_was_announced_leaves_the_destination_alone() {
        let (t, ws) = ws();
        std::fs::write(t.path().join("keep"), b"old").unwrap();
        let announced = [
            (Some(5), None),
            (Some(3), Some(hex::encode(Sha256::digest(b"abc")))),
        ];
        for (expect_size, expect_sha256) in announced {
            let opts = WriteOptions {
                expect_size,
                expect_sha256,
                ..opts()
            };
            let mut w = AtomicWrite::begin(&ws, "keep", opts).unwrap();
            w.write(b"new").unwrap();
            let err = w.commit().unwrap_err();
            assert!(matches!(err, Error::Incomplete { .. }), "{err}");
            assert_eq!(std::fs::read(t.path().join("keep")).unwrap(), b"old");
            let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "no temp file left behind");
        }
        let opts = WriteOptions {
            expect_size: Some(3),
            expect_sha256: Some(hex::encode(Sha256::digest(b"new")).to_uppercase()),
            ..opts()
        };
        let mut w = AtomicWrite::begin(&ws, "keep", opts).unwrap();
        w.write(b"new").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read(t.path().join("keep")).unwrap(), b"new");
    }

    #[test]
    fn abandoned_write_leaves_nothing() {
        let (t, ws) = ws();
        std::fs::write(t.path().join("keep"), b"old").unwrap();
        let mut w = AtomicWrite::begin(&ws, "keep", opts()).unwrap();
        w.write(b"new").unwrap();
        drop(w);
        assert_eq!(std::fs::read(t.path().join("keep")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_through_escaping_symlink_parent_is_refused() {
        let (t, ws) = ws();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("out")).unwrap();
        let err = AtomicWrite::begin(&ws, "out/x", opts()).err().unwrap();
        assert!(matches!(err, Error::Escapes { .. }), "{err:?}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // Replacing a symlink that points outside replaces the link, never the target.
        std::fs::write(outside.path().join("target"), b"precious").unwrap();
        std::os::unix::fs::symlink(outside.path().join("target"), t.path().join("link")).unwrap();
        let mut w = AtomicWrite::begin(&ws, "link", opts()).unwrap();
        w.write(b"x").unwrap();
        w.commit().unwrap();
        assert_eq!(
            std::fs::read(outside.path().join("target")).unwrap(),
            b"precious"
        );
        assert!(!t.path().join("link").is_symlink());
    }

    #[test]
    fn setuid_mode_is_refused() {
        let (_t, ws) = ws();
        let mut o = opts();
        o.mode = 0o4755;
        assert!(matches!(
            AtomicWrite::begin(&ws, "x", o),
            Err(Error::InvalidPath { .. })
        ));
    }

    #[test]
    fn remove_recursive_does_not_follow_links() {
        let (t, ws) = ws();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), b"x").unwrap();
        std::fs::create_dir_all(t.path().join("d/e")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("d/e/link")).unwrap();
        assert!(matches!(
            remove(&ws, "d", false),
            Err(Error::NotEmpty { .. })
        ));
        remove(&ws, "d", true).unwrap();
        assert!(!t.path().join("d").exists());
        assert!(outside.path().join("f").exists());
        assert!(
            remove(&ws, "", true).is_err(),
            "the root itself cannot be removed"
        );
    }

    #[test]
    fn list_stat_move_mkdir() {
        let (t, ws) = ws();
        make_dir(&ws, "x/y/z", true, 0).unwrap();
        make_dir(&ws, "x/y/z", true, 0).unwrap();
        assert!(matches!(
            make_dir(&ws, "x", false, 0),
            Err(Error::AlreadyExists { .. })
        ));
        std::fs::write(t.path().join("x/f"), b"12345").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("x/l")).unwrap();
        let (entries, truncated) = list_dir(&ws, "x", 3).unwrap();
        assert!(!truncated);
        let names: Vec<_> = entries
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        assert_eq!(names, ["x/f", "x/l", "x/y", "x/y/z"]);
        let l = stat(&ws, "x/l").unwrap();
        assert_eq!(l.file_type, FileType::Symlink);
        assert_eq!(l.symlink_target.unwrap(), "/etc/passwd");
        assert_eq!(stat(&ws, "x/f").unwrap().size, 5);
        rename(&ws, "x/f", "x/g", false).unwrap();
        std::fs::write(t.path().join("x/h"), b"").unwrap();
        assert!(matches!(
            rename(&ws, "x/g", "x/h", false),
            Err(Error::AlreadyExists { .. })
        ));
        rename(&ws, "x/g", "x/h", true).unwrap();
        assert_eq!(std::fs::read(t.path().join("x/h")).unwrap(), b"12345");
    }
}
