#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! Bad input to `csvfs mount` gives one clear message and a non-zero exit, never a panic:
//! a LUN that is not a csvfs volume, a volume of an unsupported format version, a wrong
//! cluster secret, a missing setting.

use csvfs_tests::cluster::{csvfs_exe, ClusterSpec, TestCluster};
use std::process::Command;

fn mount_output(args: &[&str]) -> (bool, String) {
    let out = Command::new(csvfs_exe())
        .args(args)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run csvfs mount");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn bad_mounts_fail_with_one_clear_message() {
    let mut c = TestCluster::start(ClusterSpec::new("errors", 1));
    let dir = c.local.dir.clone();
    let mp = dir.join("extra");
    std::fs::create_dir_all(&mp).unwrap();

    // A file of zeros is not a csvfs volume.
    let zeros = dir.join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let secret = c.local.secret.to_string_lossy().into_owned();
    let (ok, text) = mount_output(&[
        "mount",
        "--lun",
        zeros.to_str().unwrap(),
        "--node-id",
        "2",
        "--secret",
        &secret,
        mp.to_str().unwrap(),
    ]);
    assert!(!ok, "mounting zeros succeeded");
    assert!(text.contains("not a csvfs volume"), "message: {text}");
    assert!(!text.contains("panicked"), "panic: {text}");

    // A wrong secret is refused by the coordinator.
    let wrong = dir.join("wrong-secret");
    std::fs::write(&wrong, "not the secret\n").unwrap();
    let uri = c.uri();
    let (ok, text) = mount_output(&[
        "mount",
        "--lun",
        &uri,
        "--node-id",
        "2",
        "--secret",
        wrong.to_str().unwrap(),
        "--request-timeout-ms",
        "3000",
        mp.to_str().unwrap(),
    ]);
    assert!(!ok, "mounting with a wrong secret succeeded");
    assert!(text.to_lowercase().contains("secret"), "message: {text}");
    assert!(!text.contains("panicked"), "panic: {text}");
    c.expect_error("authentication");
    c.expect_error("secret");

    // A node id past the volume's limit.
    let (ok, text) = mount_output(&[
        "mount",
        "--lun",
        &uri,
        "--node-id",
        "999",
        "--secret",
        &secret,
        mp.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(text.contains("node 999"), "message: {text}");

    // A missing setting.
    let (ok, text) = mount_output(&["mount", "--lun", &uri, mp.to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("node_id"), "message: {text}");
    c.finish();
}

#[test]
fn mount_helper_mounts_like_mount_8_and_umount_stops_the_node() {
    use csvfs::local::is_mounted;
    use std::time::{Duration, Instant};
    let c = TestCluster::start(ClusterSpec::new("helper", 1));
    let dir = c.local.dir.clone();
    // mount(8) runs /sbin/mount.csvfs; a link with that name to csvfs is the helper.
    let helper = dir.join("mount.csvfs");
    std::os::unix::fs::symlink(csvfs_exe(), &helper).unwrap();
    let mp = dir.join("via-helper");
    std::fs::create_dir_all(&mp).unwrap();
    let log = dir.join("node2-helper.log");
    let opts = format!(
        "rw,node_id=2,secret={},log={}",
        c.local.secret.display(),
        log.display()
    );
    let out = Command::new(&helper)
        .arg(c.uri())
        .arg(&mp)
        .args(["-o", &opts])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.csvfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_mounted(&mp),
        "mount.csvfs returned before the mount was up"
    );
    std::fs::write(mp.join("hello"), b"from the helper mount").unwrap();
    assert_eq!(
        std::fs::read(c.mp(1).join("hello")).unwrap(),
        b"from the helper mount"
    );
    // umount(8) ends the node process (the FUSE session ends with the mount).
    let st = Command::new("umount").arg(&mp).status().unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("unmounted") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node did not stop after umount:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A missing node id is refused with a clear message.
    let out = Command::new(&helper)
        .arg(c.uri())
        .arg(&mp)
        .args(["-o", &format!("secret={}", c.local.secret.display())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node_id"));
    c.finish();
}

#[test]
fn unsupported_format_version_is_refused_with_one_clear_message() {
    use metadata_server::format::{crc_of, mkfs, MkfsOptions};
    let dir = std::env::temp_dir().join(format!("csvfs-version-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lun = dir.join("v.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let dev = block_client::open_device(lun.to_str().unwrap()).unwrap();
    mkfs(dev, &MkfsOptions::default(), &mut |_, _| {}).unwrap();
    // Format major 2 in both superblock copies, each with a valid CRC (FORMAT.md §2:
    // major at byte 8, CRC of the 512 bytes at byte 4).
    let mut img = std::fs::read(&lun).unwrap();
    let backup = img.len() - 4096;
    for at in [0, backup] {
        let sb = &mut img[at..at + 512];
        assert_eq!(&sb[8..10], &1u16.to_le_bytes(), "format major 1 at byte 8");
        sb[8..10].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc_of(sb);
        sb[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&lun, &img).unwrap();
    let mp = dir.join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let (ok, text) = mount_output(&[
        "mount",
        "--lun",
        lun.to_str().unwrap(),
        "--node-id",
        "1",
        "--secret",
        secret.to_str().unwrap(),
        mp.to_str().unwrap(),
    ]);
    assert!(!ok, "mounting a format 2.x volume succeeded");
    assert!(
        text.contains("unsupported csvfs format version 2."),
        "message: {text}"
    );
    assert_eq!(
        text.matches("unsupported csvfs format version").count(),
        1,
        "said more than once: {text}"
    );
    assert!(!text.contains("panicked"), "panic: {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
