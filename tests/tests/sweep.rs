#![allow(clippy::unwrap_used)]
//! The sweep of what killed test runs leave behind: it removes the Docker
//! objects and the temporary directories of test processes that are gone,
//! and never those of a live one, of another scope, or anything without the
//! test labels.

use std::process::{Command, Output};

use bridle_tests::docker::require_docker;
use bridle_tests::sweep::{self, OWNER_LABEL, SCOPE_LABEL, TEST_IMAGE_PREFIX};

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

fn docker(args: &[&str]) -> Output {
    bridle_tests::output_within(Command::new("docker").args(args), bridle_tests::PATIENCE).unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// Whether Docker knows the `kind` object `name` (container, volume,
/// network, image).
fn exists(kind: &str, name: &str) -> bool {
    docker(&[kind, "inspect", name]).status.success()
}

/// The owner label of a process that has exited: read while it is a
/// zombie, before it is reaped.
fn gone_owner() -> String {
    let mut child = Command::new("true").spawn().unwrap();
    let owner = sweep::process_owner(child.id()).expect("an unreaped child is in /proc");
    child.wait().unwrap();
    assert!(!sweep::owner_alive(&owner), "{owner} still runs");
    owner
}

/// `--label` arguments for an owner and a scope.
fn labels(owner: &str, scope: &str) -> Vec<String> {
    vec![
        "--label".into(),
        format!("{OWNER_LABEL}={owner}"),
        "--label".into(),
        format!("{SCOPE_LABEL}={scope}"),
    ]
}

/// `docker KIND create` of `name` with `labels` (and for a container, from
/// `image`, never started).
fn create(kind: &str, name: &str, labels: &[String], image: &str) {
    let mut args: Vec<&str> = vec![kind, "create"];
    if kind == "container" {
        args.extend(["--name", name]);
    }
    args.extend(labels.iter().map(String::as_str));
    args.push(if kind == "container" { image } else { name });
    let out = docker(&args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
}

fn marked_dir(owner: &str, scope: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bridle-host-")
        .tempdir()
        .unwrap();
    sweep::write_marker(dir.path(), owner, scope).unwrap();
    std::fs::write(dir.path().join("left-behind"), "x").unwrap();
    dir
}

fn image_scope(image: &str) -> String {
    let format = format!("{{{{index .Config.Labels {SCOPE_LABEL:?}}}}}");
    text(&docker(&["image", "inspect", "--format", &format, image]).stdout)
}

#[test]
fn the_sweep_removes_what_gone_test_processes_left_and_nothing_else() {
    needs_docker!();
    let image = bridle_tests::docker::ensure_image().unwrap();
    let gone = gone_owner();
    let live = sweep::owner();
    let here = sweep::scope();
    let elsewhere = "another-machine/another-boot/4026531836";
    let name = |what: &str| format!("bridle-sweep-test-{what}-{}", std::process::id());

    // Left by a process that is gone: swept.
    let stale = name("stale");
    for kind in ["container", "volume", "network"] {
        create(kind, &stale, &labels(&gone, here), &image);
    }
    let stale_dir = marked_dir(&gone, here);
    // An extra tag of the test image, as an earlier build would have left:
    // no process holds it, so it goes (the image itself stays: this
    // process holds its own tag). Only if the image carries this scope
    // (it does unless it came from elsewhere, as $BRIDLE_IMAGE may).
    let stale_tag = format!("{TEST_IMAGE_PREFIX}sweep-{}", std::process::id());
    let tagged = image_scope(&image) == here;
    if tagged {
        let out = docker(&["tag", &image, &stale_tag]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    } else {
        eprintln!("{image} is not labelled with this scope: its tags are not swept here");
    }
    // Of an earlier boot of this machine (when it has a machine id): every
    // process of it is gone, whatever its pid says (here this live
    // process's own): swept.
    let machine = here.split('/').next().unwrap();
    let rebooted = name("rebooted");
    let judged_by_boot = machine != "unknown";
    if judged_by_boot {
        let earlier = format!("{machine}/an-earlier-boot/1");
        create("container", &rebooted, &labels(live, &earlier), &image);
    }
    // This live process's: kept.
    let kept = name("live");
    for kind in ["container", "volume", "network"] {
        create(kind, &kept, &labels(live, here), &image);
    }
    let kept_dir = marked_dir(live, here);
    // A gone owner's pid in another scope (another container or machine
    // on the same daemon) says nothing about that process: kept.
    let foreign = name("foreign");
    create("container", &foreign, &labels(&gone, elsewhere), &image);
    let foreign_dir = marked_dir(&gone, elsewhere);
    // Not labelled as a test's owner at all: never touched.
    let unlabelled = name("unlabelled");
    create(
        "container",
        &unlabelled,
        &["--label".to_string(), "bridle.test=1".to_string()],
        &image,
    );

    let swept = sweep::sweep();
    eprintln!("swept: {swept:?}");

    // What is left, observed before cleaning up, asserted after.
    let stale_left: Vec<&str> = ["container", "volume", "network"]
        .into_iter()
        .filter(|kind| exists(kind, &stale))
        .collect();
    let kept_left: Vec<&str> = ["container", "volume", "network"]
        .into_iter()
        .filter(|kind| exists(kind, &kept))
        .collect();
    let rebooted_left = judged_by_boot && exists("container", &rebooted);
    let foreign_left = exists("container", &foreign);
    let unlabelled_left = exists("container", &unlabelled);
    let stale_tag_left = tagged && exists("image", &stale_tag);
    let image_left = exists("image", &image);
    let stale_dir_left = stale_dir.path().exists();
    let kept_dir_left = kept_dir.path().join("left-behind").exists();
    let foreign_dir_left = foreign_dir.path().join("left-behind").exists();

    for object in [&stale, &rebooted, &kept, &foreign, &unlabelled] {
        let _ = docker(&["rm", "-f", "-v", object]);
        let _ = docker(&["volume", "rm", "-f", object]);
        let _ = docker(&["network", "rm", object]);
    }
    if stale_tag_left {
        let _ = docker(&["image", "rm", &stale_tag]);
    }
    drop((stale_dir, kept_dir, foreign_dir));

    assert!(
        stale_left.is_empty(),
        "a gone owner's {stale_left:?} survived"
    );
    assert!(!rebooted_left, "a container of an earlier boot survived");
    assert_eq!(
        kept_left,
        ["container", "volume", "network"],
        "a live owner's objects were swept"
    );
    assert!(foreign_left, "another scope's container was swept");
    assert!(
        unlabelled_left,
        "a container without the owner label was swept"
    );
    assert!(!stale_tag_left, "an unheld test image tag survived");
    assert!(image_left, "the image this process holds was removed");
    assert!(!stale_dir_left, "a gone owner's directory survived");
    assert!(kept_dir_left, "a live owner's directory was swept");
    assert!(foreign_dir_left, "another scope's directory was swept");
}

/// A directory that merely looks like a test's (the prefix, no marker) is
/// not the sweep's to remove.
#[test]
fn an_unmarked_directory_is_left_alone() {
    let dir = tempfile::Builder::new()
        .prefix("bridle-cp-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("data"), "x").unwrap();
    sweep::sweep();
    assert!(dir.path().join("data").exists());
}
