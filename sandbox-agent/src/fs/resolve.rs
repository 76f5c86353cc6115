//! Resolution of request paths beneath the workspace root, done by the kernel.
//!
//! Every file operation starts from a directory fd held on the workspace root
//! and asks the kernel to resolve the rest with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`. Nothing here joins path
//! strings and then opens them: a symlink swapped in between a check and a use
//! cannot redirect an operation outside the root. Where `openat2` is missing
//! (kernels before 5.6, or a seccomp profile that refuses it) the same rules
//! are applied by walking one component at a time with `O_NOFOLLOW`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use super::Error;

/// Symlinks followed in one resolution before giving up, as the kernel does.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug)]
pub struct Workspace {
    root: OwnedFd,
    root_path: PathBuf,
    openat2: bool,
    /// Refuse every symlink during resolution, not only those that leave
    /// the root (used for restore staging, where an archive must not write
    /// through a link it created itself).
    no_symlinks: bool,
}

impl Workspace {
    /// Opens `root` (which must be a directory) as the workspace.
    pub fn at(root: &Path) -> Result<Self, Error> {
        let root_path = std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
        let c = cstring(root_path.as_os_str())?;
        // SAFETY: plain open(2) of a NUL-terminated path; the fd is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::io(root, std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let openat2 = probe_openat2(&root);
        Ok(Self {
            root,
            root_path,
            openat2,
            no_symlinks: false,
        })
    }

    /// A workspace rooted at an already open directory. It has no path of
    /// its own, so absolute request paths are refused.
    pub fn from_dir_fd(root: OwnedFd) -> Result<Self, Error> {
        let openat2 = probe_openat2(&root);
        Ok(Self {
            root,
            root_path: PathBuf::new(),
            openat2,
            no_symlinks: false,
        })
    }

    /// Forces the component walk even where openat2 exists (tests use this to
    /// exercise the fallback on kernels that have openat2).
    pub fn without_openat2(mut self) -> Self {
        self.openat2 = false;
        self
    }

    /// Resolution that refuses any symlink in a path.
    pub fn refusing_symlinks(mut self) -> Self {
        self.no_symlinks = true;
        self
    }

    pub fn uses_openat2(&self) -> bool {
        self.openat2
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.root.as_fd()
    }

    /// Turns a request path into one relative to the root. The empty path and
    /// "/" mean the root; an absolute path is accepted only when it starts
    /// with the root's own path, compared component by component. Everything
    /// else about the path (`..`, symlinks) is left to the kernel.
    pub fn relative(&self, path: &str) -> Result<PathBuf, Error> {
        if path.as_bytes().contains(&0) {
            return Err(Error::InvalidPath {
                path: path.into(),
                reason: "contains a NUL byte",
            });
        }
        let p = Path::new(path);
        if !p.is_absolute() {
            return Ok(if path.is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            });
        }
        if p == Path::new("/") {
            return Ok(PathBuf::from("."));
        }
        if self.root_path.as_os_str().is_empty() {
            return Err(Error::Escapes { path: path.into() });
        }
        match p.strip_prefix(&self.root_path) {
            Ok(rest) if rest.as_os_str().is_empty() => Ok(PathBuf::from(".")),
            Ok(rest) => Ok(rest.to_path_buf()),
            Err(_) => Err(Error::Escapes { path: path.into() }),
        }
    }

    /// Opens `rel` beneath the root with `flags` (O_CLOEXEC is always added).
    /// Symlinks are followed only while they stay beneath the root; magic
    /// links (`/proc/self/fd/N`, `/proc/self/root`) are never followed.
    pub fn open(&self, rel: &Path, flags: i32, mode: u32) -> Result<OwnedFd, Error> {
        let dir = self.root.as_raw_fd();
        if self.openat2 {
            let rules = if self.no_symlinks {
                RESOLVE_RULES | libc::RESOLVE_NO_SYMLINKS
            } else {
                RESOLVE_RULES
            };
            openat2(dir, rel, flags | libc::O_CLOEXEC, mode, rules).map_err(|e| Error::io(rel, e))
        } else {
            walk_open(dir, rel, flags | libc::O_CLOEXEC, mode, self.no_symlinks)
                .map_err(|e| Error::io(rel, e))
        }
    }

    /// Resolves the directory that holds `rel` and returns it with the final
    /// component's name, for operations that act on a name rather than follow
    /// it (create, unlink, rename, lstat, readlink). The final component must
    /// be a plain name: "", "." and ".." are refused.
    pub fn open_parent(&self, rel: &Path) -> Result<(OwnedFd, OsString), Error> {
        let name = match rel.components().next_back() {
            Some(Component::Normal(name)) => name.to_os_string(),
            _ => {
                return Err(Error::InvalidPath {
                    path: rel.display().to_string(),
                    reason: "must name an entry inside the workspace, not the root or a `..`",
                })
            }
        };
        let parent = match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = self.open(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok((dir, name))
    }

    /// Like [`Workspace::open_parent`], first creating missing parent
    /// directories. Each prefix is resolved from the root with the same rules,
    /// so a symlinked component is followed only while it stays inside.
    pub fn create_parents(&self, rel: &Path, mode: u32) -> Result<(OwnedFd, OsString), Error> {
        match self.open_parent(rel) {
            Err(Error::NotFound { .. }) => {}
            other => return other,
        }
        let mut prefix = PathBuf::new();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for comp in parent.components() {
            prefix.push(comp);
            match self.open(&prefix, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(_) => continue,
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let (dir, name) = self.open_parent(&prefix)?;
            let c = cstring(&name)?;
            // SAFETY: mkdirat on a valid dirfd and NUL-terminated name.
            let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EEXIST) {
                    return Err(Error::io(&prefix, err));
                }
            }
        }
        self.open_parent(rel)
    }
}

const RESOLVE_RULES: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;

/// openat2(2) relative to `dir`.
pub fn openat2(
    dir: RawFd,
    rel: &Path,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> std::io::Result<OwnedFd> {
    let c =
        cstring(rel.as_os_str()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut how: libc::open_how = unsafe_zeroed_open_how();
    how.flags = flags as u64;
    how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = resolve;
    loop {
        // SAFETY: `how` is a valid open_how and its size is passed; `c` is
        // NUL-terminated and outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel returned a new fd we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let err = std::io::Error::last_os_error();
        // EAGAIN: a concurrent rename raced the lookup; the kernel asks for a retry.
        if err.raw_os_error() != Some(libc::EAGAIN) && err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

fn unsafe_zeroed_open_how() -> libc::open_how {
    // SAFETY: open_how is a plain C struct of integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn probe_openat2(root: &OwnedFd) -> bool {
    match openat2(
        root.as_raw_fd(),
        Path::new("."),
        libc::O_PATH | libc::O_CLOEXEC,
        0,
        RESOLVE_RULES,
    ) {
        Ok(_) => true,
        Err(e) => {
            let code = e.raw_os_error();
            // ENOSYS: old kernel. EPERM: a seccomp profile that does not know it.
            !(code == Some(libc::ENOSYS) || code == Some(libc::EPERM))
        }
    }
}

/// The fallback resolver: one component at a time with `O_NOFOLLOW`, keeping
/// a stack of directory fds so `..` can never climb above the root, and
/// expanding relative symlinks in place. Absolute symlinks and `..` at the
/// root fail with EXDEV, exactly as RESOLVE_BENEATH does.
fn walk_open(
    root: RawFd,
    rel: &Path,
    flags: i32,
    mode: u32,
    no_symlinks: bool,
) -> std::io::Result<OwnedFd> {
    let mut pending: Vec<OsString> = components_of(rel.as_os_str())?;
    pending.reverse();
    // stack[0] is the root; deeper entries are the directories walked into.
    // SAFETY: dup of a valid fd owned by the caller.
    let root_dup = unsafe { libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0) };
    if root_dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd from F_DUPFD_CLOEXEC.
    let mut stack: Vec<OwnedFd> = vec![unsafe { OwnedFd::from_raw_fd(root_dup) }];
    let mut links = 0usize;
    while let Some(comp) = pending.pop() {
        let last = pending.is_empty();
        if comp == "." {
            if last {
                return reopen_dir(stack.last().expect("root stays").as_raw_fd(), flags);
            }
            continue;
        }
        if comp == ".." {
            if stack.len() == 1 {
                return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
            }
            stack.pop();
            if last {
                return reopen_dir(stack.last().expect("root stays").as_raw_fd(), flags);
            }
            continue;
        }
        let dir = stack.last().expect("root stays").as_raw_fd();
        let c = cstring(&comp).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        if last {
            // SAFETY: openat on a valid dirfd and NUL-terminated name.
            let fd = unsafe {
                libc::openat(
                    dir,
                    c.as_ptr(),
                    flags | libc::O_NOFOLLOW,
                    mode as libc::c_uint,
                )
            };
            if fd >= 0 {
                // SAFETY: the kernel returned a new fd we now own.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let err = std::io::Error::last_os_error();
            // ELOOP under O_NOFOLLOW means the last component is a symlink:
            // expand it below. Any other error is final.
            if err.raw_os_error() != Some(libc::ELOOP) || flags & libc::O_NOFOLLOW != 0 {
                return Err(err);
            }
            // O_PATH|O_NOFOLLOW on a symlink succeeds instead of ELOOP, so
            // fall through to readlink for that case as well.
        }
        // SAFETY: as above.
        let fd = unsafe {
            libc::openat(
                dir,
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new fd we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut st: libc::stat = unsafe_zeroed_stat();
        // SAFETY: fstat on a valid fd into a valid struct.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => {
                if last && flags & libc::O_NOFOLLOW != 0 {
                    return Ok(fd);
                }
                links += 1;
                if links > MAX_SYMLINKS || no_symlinks {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = readlink_fd(fd.as_raw_fd())?;
                if target.as_bytes().first() == Some(&b'/') {
                    return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
                }
                let mut expanded = components_of(&target)?;
                expanded.reverse();
                pending.extend(expanded);
            }
            libc::S_IFDIR => {
                if last {
                    return reopen_dir(fd.as_raw_fd(), flags);
                }
                stack.push(fd);
            }
            _ => {
                if !last {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
                }
                return Ok(fd);
            }
        }
    }
    reopen_dir(stack.last().expect("root stays").as_raw_fd(), flags)
}

fn reopen_dir(dir: RawFd, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: openat of "." relative to a valid directory fd.
    let fd = unsafe { libc::openat(dir, c".".as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn components_of(p: &OsStr) -> std::io::Result<Vec<OsString>> {
    let bytes = p.as_bytes();
    if bytes.first() == Some(&b'/') {
        return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
    }
    Ok(bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| OsString::from_vec(c.to_vec()))
        .collect())
}

pub(crate) fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: stat is a plain C struct; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// readlink of an `O_PATH | O_NOFOLLOW` fd on a symlink (empty name).
fn readlink_fd(fd: RawFd) -> std::io::Result<OsString> {
    readlink_at(fd, c"")
}

/// readlinkat(2) into an owned string.
pub(crate) fn readlink_at(dir: RawFd, name: &CStr) -> std::io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

pub(crate) fn cstring(s: &OsStr) -> Result<CString, Error> {
    CString::new(s.as_bytes()).map_err(|_| Error::InvalidPath {
        path: s.to_string_lossy().into_owned(),
        reason: "contains a NUL byte",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let outer = tempfile::tempdir().unwrap();
        let ws = outer.path().join("ws");
        std::fs::create_dir_all(ws.join("dir/sub")).unwrap();
        std::fs::write(ws.join("dir/file.txt"), b"inside").unwrap();
        std::fs::write(outer.path().join("secret"), b"outside").unwrap();
        symlink("../../secret", ws.join("dir/escape")).unwrap();
        symlink("/etc/passwd", ws.join("abs")).unwrap();
        symlink("file.txt", ws.join("dir/ok-link")).unwrap();
        symlink("sub/../file.txt", ws.join("dir/ok-dotdot")).unwrap();
        symlink("/proc/self/root/etc/passwd", ws.join("proc-root")).unwrap();
        symlink("loop2", ws.join("loop1")).unwrap();
        symlink("loop1", ws.join("loop2")).unwrap();
        (outer, ws)
    }

    fn read(ws: &Workspace, p: &str) -> Result<String, Error> {
        let rel = ws.relative(p)?;
        let fd = ws.open(&rel, libc::O_RDONLY, 0)?;
        Ok(std::io::read_to_string(std::fs::File::from(fd)).unwrap())
    }

    fn both(root: &Path) -> Vec<Workspace> {
        let a = Workspace::at(root).unwrap();
        assert!(
            a.uses_openat2(),
            "this kernel has openat2; the fallback is tested separately"
        );
        vec![a, Workspace::at(root).unwrap().without_openat2()]
    }

    #[test]
    fn links_that_stay_inside_resolve() {
        let (_t, root) = setup();
        for ws in both(&root) {
            assert_eq!(read(&ws, "dir/file.txt").unwrap(), "inside");
            assert_eq!(read(&ws, "dir/ok-link").unwrap(), "inside");
            assert_eq!(read(&ws, "dir/ok-dotdot").unwrap(), "inside");
            assert_eq!(read(&ws, "dir/sub/../file.txt").unwrap(), "inside");
            let abs = format!("{}/dir/file.txt", ws.root_path().display());
            assert_eq!(read(&ws, &abs).unwrap(), "inside");
        }
    }

    #[test]
    fn escapes_are_refused() {
        let (_t, root) = setup();
        for ws in both(&root) {
            for p in [
                "../secret",
                "dir/../../secret",
                "dir/escape",
                "abs",
                "proc-root",
                "/etc/passwd",
                "/proc/self/root/etc/passwd",
                "dir/sub/../../../secret",
            ] {
                match read(&ws, p) {
                    Err(Error::Escapes { .. }) | Err(Error::SymlinkLoop { .. }) => {}
                    other => panic!(
                        "{p} (openat2={}): expected refusal, got {other:?}",
                        ws.uses_openat2()
                    ),
                }
            }
            assert!(matches!(read(&ws, "loop1"), Err(Error::SymlinkLoop { .. })));
            assert!(matches!(read(&ws, "missing"), Err(Error::NotFound { .. })));
        }
    }

    #[test]
    fn parent_of_a_plain_name_is_the_root() {
        let (_t, root) = setup();
        let ws = Workspace::at(&root).unwrap();
        let (_, name) = ws.open_parent(Path::new("x")).unwrap();
        assert_eq!(name, "x");
        assert!(ws.open_parent(Path::new(".")).is_err());
        assert!(ws.open_parent(Path::new("dir/..")).is_err());
        // The parent is resolved by the kernel, so a symlinked parent that
        // leaves the root is refused even though the name itself is plain.
        std::os::unix::fs::symlink("/tmp", root.join("tmp-link")).unwrap();
        assert!(matches!(
            ws.open_parent(Path::new("tmp-link/x")),
            Err(Error::Escapes { .. })
        ));
    }
}
