//! A real file system on a real `cairn dev` volume: nbdfuse exposes the export as a file, a
//! loop device turns it into a block device, ext4 goes on top. A replica is SIGKILLed between
//! two batches of file writes; afterwards e2fsck finds the file system clean and every file
//! reads back byte for byte after a fresh mount.
//!
//! The loop device uses 4 KiB sectors: the export's minimum block size is 4096 and nbdfuse
//! passes requests through unchanged, so 512-byte I/O would be refused (EINVAL).
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    assert_modes, assert_same_bytes, enter_private_netns, have_tools, random_bytes, run_bounded,
    run_ok, wait_until, Dev, Proc, Rng, NBD_URI,
};

/// True when `dir` is a mount point (from `/proc/self/mountinfo`).
fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.display().to_string();
    info.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}

/// `umount DIR`, bounded; true on success.
fn umount(dir: &Path) -> bool {
    run_bounded(Command::new("umount").arg(dir), Duration::from_secs(60)).success()
}

/// A mounted file system; unmounted on drop unless already.
struct Mount(PathBuf);

impl Mount {
    fn new(dev: &str, dir: &Path) -> Mount {
        run_ok("mount", &[dev, &dir.display().to_string()]);
        Mount(dir.to_owned())
    }

    fn unmount(&self) {
        assert!(umount(&self.0), "umount {}", self.0.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            umount(&self.0);
        }
    }
}

/// An attached loop device (`/dev/loopN`); detached on drop unless already.
struct Loop {
    dev: String,
    attached: bool,
}

impl Loop {
    fn detach(&mut self) {
        run_ok("losetup", &["-d", &self.dev]);
        self.attached = false;
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.attached {
            let _ = run_bounded(
                Command::new("losetup").args(["-d", &self.dev]),
                Duration::from_secs(60),
            );
        }
    }
}

/// nbdfuse serving the export as `DIR/disk`; on drop DIR is unmounted (if still) and the
/// nbdfuse process waited for, then killed if it is still there.
struct Fuse {
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Fuse {
    fn start(dir: &Path, pidfile: &Path) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let proc = Proc::spawn(
            Command::new("nbdfuse")
                .arg("-P")
                .arg(pidfile)
                .arg(dir.join("disk"))
                .arg(NBD_URI),
            "nbdfuse",
        );
        let mut fuse = Fuse {
            dir: dir.to_owned(),
            proc: Some(proc),
        };
        wait_until(
            "nbdfuse to write its pid file",
            Duration::from_secs(60),
            || {
                let p = fuse.proc.as_mut().unwrap();
                assert!(!p.exited(), "nbdfuse exited before it was ready");
                std::fs::read_to_string(pidfile).is_ok_and(|s| !s.trim().is_empty())
            },
        );
        fuse
    }

    /// Unmounts and asserts nbdfuse exits 0 within 30 s.
    fn stop(&mut self) {
        assert!(umount(&self.dir), "umount {}", self.dir.display());
        let run = self.proc.take().unwrap().finish(Duration::from_secs(30));
        run.expect_success("nbdfuse after umount");
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            if is_mounted(&self.dir) {
                umount(&self.dir);
            }
            let _ = p.finish(Duration::from_secs(10));
        }
    }
}

/// Writes `files` under `root` and remembers them in `model`.
fn write_files(root: &Path, files: Vec<(String, Vec<u8>)>, model: &mut Vec<(String, Vec<u8>)>) {
    for (name, data) in files {
        let path = root.join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        model.retain(|(n, _)| *n != name);
        model.push((name, data));
    }
}

fn small_files(rng: &mut Rng, dir: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let len = rng.range(1, 12_000) as usize;
            (format!("{dir}/f{i:04}"), random_bytes(rng, len))
        })
        .collect()
}

fn check_files(root: &Path, model: &[(String, Vec<u8>)], what: &str) {
    for (name, data) in model {
        let got =
            std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("{what}: read {name}: {e}"));
        assert_same_bytes(&got, data, &format!("{what}: {name}"));
    }
}

#[test]
fn ext4_survives_a_replica_kill() {
    if !enter_private_netns()
        || !have_tools(&[
            "nbdfuse",
            "losetup",
            "mkfs.ext4",
            "e2fsck",
            "mount",
            "umount",
        ])
    {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: /dev/fuse is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("data"), "2s");
    let mut fuse = Fuse::start(&tmp.path().join("fuse"), &tmp.path().join("nbdfuse.pid"));
    let disk = fuse.dir.join("disk");
    let attach = run_bounded(
        Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--direct-io=on",
                "--sector-size",
                "4096",
            ])
            .arg(&disk),
        Duration::from_secs(60),
    );
    if !attach.success() {
        println!(
            "SKIP: losetup cannot attach a loop device: {}",
            attach.stderr.trim()
        );
        return;
    }
    let mut lo = Loop {
        dev: attach.stdout.trim().to_owned(),
        attached: true,
    };
    assert!(
        lo.dev.starts_with("/dev/loop"),
        "losetup printed {:?}",
        attach.stdout
    );
    run_ok("mkfs.ext4", &["-q", &lo.dev]);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();

    let mut rng = Rng::new(0x5eed_0006);
    let mut model = Vec::new();
    {
        let m = Mount::new(&lo.dev, &mnt);
        let mut files = vec![("big1".to_owned(), random_bytes(&mut rng, 20 << 20))];
        files.extend(small_files(&mut rng, "before", 300));
        write_files(&mnt, files, &mut model);
        run_ok("sync", &["-f", &mnt_s]);

        dev.kill_replica("r2");
        let mut files = vec![("big2".to_owned(), random_bytes(&mut rng, 8 << 20))];
        files.extend(small_files(&mut rng, "after", 200));
        // Overwrite some files written before the kill, too.
        files.extend(small_files(&mut rng, "before", 50));
        write_files(&mnt, files, &mut model);
        run_ok("sync", &["-f", &mnt_s]);
        check_files(&mnt, &model, "before umount");
        m.unmount();
    }
    assert_modes(&dev.status(), &[("r1", "RW"), ("r2", "ERR"), ("r3", "RW")]);

    let fsck = run_bounded(
        Command::new("e2fsck").args(["-fn", &lo.dev]),
        Duration::from_secs(120),
    );
    fsck.expect_success("e2fsck -fn after the replica kill");

    {
        let m = Mount::new(&lo.dev, &mnt);
        check_files(&mnt, &model, "after a fresh mount");
        let mut names: Vec<String> = Vec::new();
        for sub in ["before", "after"] {
            for e in std::fs::read_dir(mnt.join(sub)).unwrap() {
                names.push(format!(
                    "{sub}/{}",
                    e.unwrap().file_name().to_string_lossy()
                ));
            }
        }
        assert_eq!(
            names.len() + 2,
            model.len(),
            "files on the file system: {names:?}"
        );
        m.unmount();
    }
    lo.detach();
    fuse.stop();
    dev.assert_verified("r1 and r3 after the file system work");
}
