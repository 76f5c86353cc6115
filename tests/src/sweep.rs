//! What the tests make in Docker and in the temporary directory carries the
//! test process that made it; a sweep removes what processes that are gone
//! left behind (a suite killed midway), and nothing else.
//!
//! Every container, volume and network a test makes (itself, or through a
//! control plane it started, whose `docker.labels` carry them) has two
//! labels:
//!
//! - `bridle.test.owner=<pid>:<start>`: the test process and its start time
//!   (field 22 of `/proc/<pid>/stat`, in clock ticks since boot), so that a
//!   reused pid is never taken for the owner;
//! - `bridle.test.scope=<machine id>/<boot id>/<pid namespace>`: where that
//!   pid means something. A sweep judges what carries its own scope by the
//!   owner's pid, and what carries an earlier boot of this machine as stale
//!   (every process of it is gone); nothing else: test processes in another
//!   container or on another machine that share the Docker daemon are not
//!   in this `/proc`, and would all look gone.
//!
//! The temporary directories the tests make (`bridle-cp-*`, `bridle-host-*`, `bridle-upstream-*`,
//! `bridle-sock-*`) hold the same two values in a file at their top,
//! [`MARKER`].
//!
//! The sweep removes the containers (with their anonymous volumes), then the
//! volumes and networks, of owners that are gone, and their marked
//! temporary directories (unmounting first what a control plane mounted
//! there). Test images (`bridle-sandbox:test-*`, one per agent binary and
//! scope, labelled with the scope) are a cache that later runs share, so
//! they are judged by use, not by who built them: a process holds a shared
//! lock on a file per image it uses ([`hold_image`]) for as long as it runs,
//! and the sweep removes an image only while it holds that lock
//! exclusively, and without force, so never one a container still uses.
//! (Hence an image per scope: the locks are in this machine's temporary
//! directory, where another container's users of the image would not be.)
//!
//! [`once`] sweeps at a process's first use of Docker (from
//! [`crate::docker::ensure_image`], which every container and control plane
//! of the tests goes through), so every suite starts with a sweep, whatever
//! runs it. Its problems (no Docker) are printed and passed over: the test
//! that needed Docker reports its own error.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, Once, OnceLock};

use anyhow::{bail, Context};

/// The label naming the test process that made a Docker object.
pub const OWNER_LABEL: &str = "bridle.test.owner";
/// The label naming where [`OWNER_LABEL`]'s pid is meaningful.
pub const SCOPE_LABEL: &str = "bridle.test.scope";
/// The file at the top of a test's temporary directory: its owner's line,
/// then its scope's.
pub const MARKER: &str = "bridle-test-owner";
/// How the names of the temporary directories the tests make start.
pub const TEMP_PREFIXES: [&str; 4] = [
    "bridle-cp-",
    "bridle-host-",
    "bridle-sock-",
    "bridle-upstream-",
];
/// How the tags of the images [`crate::docker::ensure_image`] builds start.
pub const TEST_IMAGE_PREFIX: &str = "bridle-sandbox:test-";

struct Identity {
    owner: String,
    scope: String,
    machine: Option<String>,
    boot: Option<String>,
    /// Whether the boot id and the pid namespace could be read: if not, the
    /// scope would say nothing and the sweep does nothing.
    scope_known: bool,
}

fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        let machine = read_id("/etc/machine-id").or_else(|| read_id("/var/lib/dbus/machine-id"));
        let boot = read_id("/proc/sys/kernel/random/boot_id");
        let pidns = pid_namespace();
        let unknown = || "unknown".to_string();
        Identity {
            owner: process_owner(std::process::id()).expect("this process is in /proc"),
            scope: format!(
                "{}/{}/{}",
                machine.clone().unwrap_or_else(unknown),
                boot.clone().unwrap_or_else(unknown),
                pidns.map_or_else(unknown, |n| n.to_string())
            ),
            machine,
            scope_known: boot.is_some() && pidns.is_some(),
            boot,
        }
    })
}

/// The one line of `path`, if it has one (and no `/`, the scope's separator).
fn read_id(path: &str) -> Option<String> {
    let id = std::fs::read_to_string(path).ok()?.trim().to_string();
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// The inode of this process's pid namespace.
fn pid_namespace() -> Option<u64> {
    Some(std::fs::metadata("/proc/self/ns/pid").ok()?.ino())
}

/// Whether what `owner` made in `their_scope` is stale: its owner is a gone
/// process of this scope, or a process of an earlier boot of this machine.
/// What comes from elsewhere cannot be judged here, and is not stale.
fn stale(owner: &str, their_scope: &str) -> bool {
    if their_scope == scope() {
        !owner_alive(owner)
    } else {
        earlier_boot(their_scope)
    }
}

/// Whether `their_scope` is this machine's, from an earlier boot: every
/// process of it is gone, whatever its pid namespace.
fn earlier_boot(their_scope: &str) -> bool {
    let me = identity();
    let (Some(my_machine), Some(my_boot)) = (&me.machine, &me.boot) else {
        return false;
    };
    let mut parts = their_scope.split('/');
    let (Some(machine), Some(boot)) = (parts.next(), parts.next()) else {
        return false;
    };
    machine == my_machine.as_str() && boot != my_boot.as_str() && boot != "unknown"
}

/// This process as an owner: `<pid>:<start>`.
pub fn owner() -> &'static str {
    &identity().owner
}

/// Where this process's pid is meaningful:
/// `<machine id>/<boot id>/<pid namespace>`.
pub fn scope() -> &'static str {
    &identity().scope
}

/// `--label` arguments (for `docker run`, `create` or `build`) marking an
/// object as this process's.
pub fn label_args() -> [String; 4] {
    [
        "--label".to_string(),
        format!("{OWNER_LABEL}={}", owner()),
        "--label".to_string(),
        format!("{SCOPE_LABEL}={}", scope()),
    ]
}

/// `--label` arguments for a test image: its scope only. An owner label
/// would pass to every container made from the image, and once the process
/// that built it is gone, the sweep would take those containers (a test's
/// own, unlabelled ones included) for leftovers.
pub fn image_label_args() -> [String; 2] {
    ["--label".to_string(), format!("{SCOPE_LABEL}={}", scope())]
}

/// The same labels as a TOML inline table: the value of `docker.labels` for
/// a control plane this process starts.
pub fn labels_toml() -> String {
    format!(
        "{{ {OWNER_LABEL:?} = {:?}, {SCOPE_LABEL:?} = {:?} }}",
        owner(),
        scope()
    )
}

/// `<pid>:<start>` of the process `pid`, while it exists (a zombie, not
/// reaped yet, included).
pub fn process_owner(pid: u32) -> Option<String> {
    let (_, start) = stat(pid)?;
    Some(format!("{pid}:{start}"))
}

/// The state and the start time (fields 3 and 22) of `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command's name (field 2) may hold spaces and parentheses: fields
    // are counted from its last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.to_string();
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// Whether the process an owner label names still runs. What cannot be
/// judged (a malformed label, a `/proc` that hides other users' processes)
/// counts as alive: the sweep leaves it alone.
pub fn owner_alive(owner: &str) -> bool {
    let Some((pid, start)) = owner.split_once(':') else {
        return true;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return true;
    };
    if pid == 0 || pid > i32::MAX as u32 {
        return true;
    }
    match stat(pid) {
        Some((state, now)) => now == start && state != "Z" && state != "X",
        None => {
            // SAFETY: kill(2) with signal 0 sends nothing; it only asks
            // whether the pid exists.
            let answer = unsafe { libc::kill(pid as libc::pid_t, 0) };
            let gone =
                answer != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            !gone
        }
    }
}

/// Marks `dir` (one of [`TEMP_PREFIXES`]) as this process's.
pub fn mark(dir: &Path) -> std::io::Result<()> {
    write_marker(dir, owner(), scope())
}

/// Marks `dir` as `owner`'s, in `scope`.
pub fn write_marker(dir: &Path, owner: &str, scope: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(MARKER), format!("{owner}\n{scope}\n"))
}

/// A new temporary directory whose name starts with `prefix` (one of
/// [`TEMP_PREFIXES`]), marked as this process's.
pub fn temp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    mark(dir.path())?;
    Ok(dir)
}

/// The file whose locks say who uses the image `tag`.
fn image_lock_path(tag: &str) -> PathBuf {
    let name: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::env::temp_dir().join(format!("bridle-image-{name}.users"))
}

/// Marks the image `tag` as used by this process until it exits (however
/// it exits: the kernel drops the lock): no sweep removes it meanwhile.
pub fn hold_image(tag: &str) -> anyhow::Result<()> {
    static HELD: Mutex<BTreeMap<String, File>> = Mutex::new(BTreeMap::new());
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if held.contains_key(tag) {
        return Ok(());
    }
    let lock = crate::lock_file_within(&image_lock_path(tag), libc::LOCK_SH, crate::PATIENCE)
        .with_context(|| format!("marking the image {tag} as in use"))?;
    held.insert(tag.to_string(), lock);
    Ok(())
}

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    pub networks: Vec<String>,
    pub images: Vec<String>,
    pub dirs: Vec<PathBuf>,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
            && self.volumes.is_empty()
            && self.networks.is_empty()
            && self.images.is_empty()
            && self.dirs.is_empty()
    }
}

/// [`sweep`], the first time it is called in this process; later calls
/// return at once.
pub fn once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let swept = sweep();
        if !swept.is_empty() {
            eprintln!("bridle-tests: swept what gone test processes left behind: {swept:?}");
        }
    });
}

/// Removes what test processes that are gone left behind, in this scope,
/// and nothing else (see the module's documentation). Problems are printed
/// to stderr and passed over, never returned.
pub fn sweep() -> Swept {
    let mut swept = Swept::default();
    if !identity().scope_known {
        eprintln!(
            "bridle-tests sweep: this machine's boot id or this process's pid namespace \
             cannot be read, so whose test objects are whose cannot be told: nothing swept"
        );
        return swept;
    }
    // Containers first: what they use (volumes, networks, images, socket
    // directories) can go only after them.
    swept.containers = sweep_objects("container", &["ps", "-a"], ".ID", &["rm", "-f", "-v"]);
    swept.volumes = sweep_objects("volume", &["volume", "ls"], ".Name", &["volume", "rm"]);
    swept.networks = sweep_objects("network", &["network", "ls"], ".ID", &["network", "rm"]);
    swept.images = sweep_images();
    swept.dirs = sweep_temp_dirs();
    swept
}

/// `docker ARGS`' stdout; a failure (or no answer within
/// [`crate::PATIENCE`]) is an error with its stderr.
fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = crate::output_within(Command::new("docker").args(args), crate::PATIENCE)
        .with_context(|| format!("running docker {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lists the `kind` objects with an owner label (`docker LIST`, naming each
/// by the template field `id`) and removes (`docker REMOVE id`) those of this
/// scope whose owner is gone; answers what it removed.
fn sweep_objects(kind: &str, list: &[&str], id: &str, remove: &[&str]) -> Vec<String> {
    let filter = format!("label={OWNER_LABEL}");
    let format = format!(
        "{{{{{id}}}}}\t{}\t{}",
        label_field(OWNER_LABEL),
        label_field(SCOPE_LABEL)
    );
    let mut args = list.to_vec();
    args.extend(["--filter", filter.as_str(), "--format", format.as_str()]);
    let listed = match docker(&args) {
        Ok(listed) => listed,
        Err(e) => {
            eprintln!("bridle-tests sweep: listing test {kind}s: {e:#}");
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for line in listed.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let &[name, owner, their_scope] = fields.as_slice() else {
            continue;
        };
        if !stale(owner, their_scope) {
            continue;
        }
        let mut args = remove.to_vec();
        args.push(name);
        match docker(&args) {
            Ok(_) => removed.push(name.to_string()),
            Err(e) => {
                let e = e.to_string();
                // Another process's sweep may have been first.
                if !e.contains("No such") && !e.contains("not found") {
                    eprintln!("bridle-tests sweep: removing {kind} {name}: {e}");
                }
            }
        }
    }
    removed
}

/// The Go template of `docker … ls --format` for the label `name`'s value.
fn label_field(name: &str) -> String {
    format!("{{{{.Label {name:?}}}}}")
}

/// Removes the test images of this scope (or of an earlier boot of this
/// machine) that no live process holds ([`hold_image`]) and no container
/// uses; answers what it removed.
fn sweep_images() -> Vec<String> {
    let reference = format!("reference={TEST_IMAGE_PREFIX}*");
    let labelled = format!("label={SCOPE_LABEL}");
    let args = [
        "images",
        "--filter",
        &reference,
        "--filter",
        &labelled,
        "--format",
        "{{.Repository}}:{{.Tag}}",
    ];
    let listed = match docker(&args) {
        Ok(listed) => listed,
        Err(e) => {
            eprintln!("bridle-tests sweep: listing test images: {e:#}");
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for tag in listed.lines() {
        if !tag.starts_with(TEST_IMAGE_PREFIX) {
            continue;
        }
        let format = format!("{{{{index .Config.Labels {SCOPE_LABEL:?}}}}}");
        let Ok(their_scope) = docker(&["image", "inspect", "--format", &format, tag]) else {
            continue;
        };
        let their_scope = their_scope.trim();
        if their_scope != scope() && !earlier_boot(their_scope) {
            continue;
        }
        let path = image_lock_path(tag);
        // Held exclusively while the image goes, so no process can start
        // using it meanwhile (it would wait, then find it gone and build it).
        let lock = match crate::try_lock_file(&path, libc::LOCK_EX) {
            Ok(Some(lock)) => lock,
            // A live process uses it.
            Ok(None) => continue,
            Err(e) => {
                eprintln!("bridle-tests sweep: locking {}: {e}", path.display());
                continue;
            }
        };
        match docker(&["image", "rm", tag]) {
            Ok(_) => {
                removed.push(tag.to_string());
                let _ = std::fs::remove_file(&path);
            }
            // Used by a container (a stopped one too): kept.
            Err(e) if e.to_string().contains("container") => {}
            Err(e) if e.to_string().contains("No such") => {}
            Err(e) => eprintln!("bridle-tests sweep: removing image {tag}: {e:#}"),
        }
        drop(lock);
    }
    removed
}

/// Removes the marked temporary directories of this scope whose owner is
/// gone (and this user's: another user's are theirs to sweep); answers
/// what it removed.
fn sweep_temp_dirs() -> Vec<PathBuf> {
    let tmp = std::env::temp_dir();
    let entries = match std::fs::read_dir(&tmp) {
        Ok(entries) => entries,
        Err(e) => {
            eprintln!("bridle-tests sweep: reading {}: {e}", tmp.display());
            return Vec::new();
        }
    };
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !TEMP_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) {
            continue;
        }
        // Not followed: a link is nobody's test directory.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me {
            continue;
        }
        let dir = entry.path();
        let Ok(marker) = std::fs::read_to_string(dir.join(MARKER)) else {
            continue;
        };
        let mut lines = marker.lines();
        let (Some(owner), Some(their_scope)) = (lines.next(), lines.next()) else {
            continue;
        };
        if !stale(owner, their_scope) {
            continue;
        }
        match remove_dir_unmounting(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) => eprintln!("bridle-tests sweep: removing {}: {e:#}", dir.display()),
        }
    }
    removed
}

/// Unmounts what is mounted under `dir` (the disks of a control plane that
/// was killed), then removes it; refuses while anything is still mounted
/// there, so removing never reaches into a filesystem mounted inside.
fn remove_dir_unmounting(dir: &Path) -> anyhow::Result<()> {
    let dir = std::fs::canonicalize(dir)?;
    for point in mounts_under(&dir)? {
        let unmounted = crate::output_within(Command::new("umount").arg(&point), crate::PATIENCE);
        if !unmounted.is_ok_and(|o| o.status.success()) {
            let _ = crate::output_within(
                Command::new("umount").arg("-l").arg(&point),
                crate::PATIENCE,
            );
        }
    }
    let left = mounts_under(&dir)?;
    if !left.is_empty() {
        bail!("still mounted there: {left:?}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_point(point)))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    Ok(points)
}

/// A mount point as mountinfo writes it, with `\NNN` octal escapes for
/// space, tab, newline and backslash, decoded.
fn unescape_mount_point(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = if bytes[i] == b'\\' {
            bytes
                .get(i + 1..i + 4)
                .and_then(|digits| std::str::from_utf8(digits).ok())
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        } else {
            None
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_an_exited_one_is_not() {
        assert!(owner_alive(owner()));
        let mut child = Command::new("true").spawn().unwrap();
        let exited = process_owner(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!owner_alive(&exited));
        // The same pid with another start time is another process.
        let (pid, start) = owner().split_once(':').unwrap();
        let later: u64 = start.parse::<u64>().unwrap() + 1;
        assert!(!owner_alive(&format!("{pid}:{later}")));
        // What cannot be judged is left alone.
        assert!(owner_alive("nonsense"));
        assert!(owner_alive("0:1"));
    }

    #[test]
    fn an_earlier_boot_of_this_machine_is_stale_and_elsewhere_is_not_judged() {
        let here = scope();
        let (machine, rest) = here.split_once('/').unwrap();
        let (_, pidns) = rest.split_once('/').unwrap();
        // This scope is judged by the owner: this process runs.
        assert!(!stale(owner(), here));
        if machine != "unknown" {
            assert!(stale(
                owner(),
                &format!("{machine}/an-earlier-boot/{pidns}")
            ));
        }
        // Another machine's, or one that could not tell: never.
        assert!(!stale(
            "1:1",
            &format!("another-machine/another-boot/{pidns}")
        ));
        assert!(!stale("1:1", "unknown/unknown/1"));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point("/tmp/a\\040b\\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mount_point("/tmp/plain\\"), "/tmp/plain\\");
    }
}
