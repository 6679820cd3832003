//! The backup store against a real S3 server: s3s-fs 0.14.1 started by the test on a
//! loopback port with a temp dir (buckets are folders in it). Prints `SKIP:` and passes
//! when `s3s-fs` is not on PATH (tests/run installs it).

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_backup::*;
use common::*;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutPayload};

const BUCKET: &str = "cairn-test";

struct S3Server {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
}

impl S3Server {
    /// Starts s3s-fs on a free loopback port, or None (after printing SKIP) without it.
    fn start(root: &FsPath) -> Option<S3Server> {
        if Command::new("s3s-fs").arg("--version").output().is_err() {
            println!("SKIP: s3s-fs is not on PATH (cargo install s3s-fs@0.14.1 --locked --features binary)");
            return None;
        }
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = S3Server {
            child: None,
            port,
            root: root.to_path_buf(),
        };
        s.restart();
        Some(s)
    }

    /// (Re)starts the server on the same port and directory and waits until it accepts.
    fn restart(&mut self) {
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", "AKTEST", "--secret-key", "SKTEST"])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "s3s-fs exited: {exited:?}");
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20)); // polling a condition
        }
    }

    /// Kills the server and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
            region: Some("us-east-1".into()),
            access_key_id: Some("AKTEST".into()),
            secret_access_key: Some("SKTEST".into()),
            max_retries: Some(2),
            retry_timeout: Some(Duration::from_secs(3)),
            request_timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        }
    }

    fn target(&self, prefix: &str) -> Target {
        Target::open(&format!("s3://{BUCKET}/{prefix}"), &self.config()).unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spec(name: &str) -> BackupSpec {
    BackupSpec {
        name: name.into(),
        volume: "vol1".into(),
        snapshot: format!("snap-{name}"),
    }
}

async fn restore_vec(t: &Target, name: &str, size: usize) -> Vec<u8> {
    let sink = MemImage::zeroed(size);
    let r = restore(t, name, &sink, &RestoreOptions::default())
        .await
        .unwrap();
    println!("restore: {}", serde_json::to_string(&r).unwrap());
    sink.to_vec()
}

async fn listed(t: &Target, under: &str) -> BTreeSet<String> {
    let prefix = t.block_key(&blake3::hash(b"x")).to_string();
    let root = prefix.split("/blocks/").next().unwrap().to_string();
    let v: Vec<_> = t
        .store()
        .list(Some(&Path::from(format!("{root}/{under}"))))
        .try_collect()
        .await
        .unwrap();
    v.into_iter().map(|m| m.location.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_full_incremental_delete_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = S3Server::start(dir.path()) else {
        return;
    };
    let t = server.target("backups/vol1");

    // The GC lock needs conditional create (If-None-Match: *).
    let probe = Path::from("backups/vol1/probe");
    t.store()
        .put_opts(
            &probe,
            PutPayload::from_static(b"1"),
            PutMode::Create.into(),
        )
        .await
        .unwrap();
    let second = t
        .store()
        .put_opts(
            &probe,
            PutPayload::from_static(b"2"),
            PutMode::Create.into(),
        )
        .await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "s3s-fs must refuse a second create: {second:?}"
    );
    t.store().delete(&probe).await.unwrap();

    let blocks = 100;
    let mut v = random_volume(blocks, 7);
    // Some holes: blocks 90-99 all zero.
    v[90 * BS..].fill(0);
    let snap1 = v.clone();
    let full = backup(
        &t,
        &MemImage::from_vec(v.clone()),
        &spec("full"),
        &BackupOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!((full.blocks_new, full.blocks_hole), (90, 10), "{full:?}");
    println!("full backup: {}", serde_json::to_string(&full).unwrap());

    // 1 % of the blocks change.
    let changed = vec![change_block(&mut v, 42, 4242)];
    let opts = BackupOptions {
        incremental: Some(Incremental {
            parent: "full".into(),
            changed,
        }),
        compression: Compression::Zstd(3),
        ..Default::default()
    };
    let inc = backup(&t, &MemImage::from_vec(v.clone()), &spec("inc"), &opts)
        .await
        .unwrap();
    println!(
        "incremental backup: {}",
        serde_json::to_string(&inc).unwrap()
    );
    let volume = (blocks * BS) as u64;
    assert_eq!(inc.blocks_new, 1, "{inc:?}");
    assert!(
        inc.bytes_uploaded * 50 <= volume,
        "uploaded {} of {volume}",
        inc.bytes_uploaded
    );

    let names: Vec<_> = list(&t).await.unwrap();
    assert_eq!(names.len(), 2);
    let inc_info = names.iter().find(|b| b.name == "inc").unwrap();
    assert_eq!(inc_info.parent.as_deref(), Some("full"));
    assert_eq!(inc_info.snapshot, "snap-inc");
    assert_same(&restore_vec(&t, "full", v.len()).await, &snap1);
    assert_same(&restore_vec(&t, "inc", v.len()).await, &v);

    // Delete the first backup: the second still restores, unreferenced blocks are gone.
    let report = delete(&t, "full", &CoordOptions::default()).await.unwrap();
    assert_eq!(report.blocks_deleted, 1, "{report:?}");
    let m = read_manifest(&t, "inc").await.unwrap();
    let want: BTreeSet<String> = m
        .blocks
        .iter()
        .map(|b| t.block_key(&b.hash().unwrap()).to_string())
        .collect();
    assert_eq!(listed(&t, "blocks").await, want);
    assert_same(&restore_vec(&t, "inc", v.len()).await, &v);

    // Corrupt one block object: the restore fails and names it.
    let victim = m.blocks.iter().find(|b| b.index == 42).unwrap();
    let key = t.block_key(&victim.hash().unwrap());
    let mut obj = t
        .store()
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let last = obj.len() - 1;
    obj[last] ^= 1;
    t.store().put(&key, PutPayload::from(obj)).await.unwrap();
    let sink = MemImage::zeroed(v.len());
    let e = restore(&t, "inc", &sink, &RestoreOptions::default())
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("corrupt block 42") && msg.contains(&key.to_string()),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_stopped_mid_backup_fails_cleanly_and_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = S3Server::start(dir.path()) else {
        return;
    };
    let server = Arc::new(Mutex::new(server));
    let t = server.lock().unwrap().target("mid");
    let v = random_volume(40, 99);
    let mut src = GatedSource::new(MemImage::from_vec(v.clone()), u64::MAX);
    let s2 = server.clone();
    // The server dies just before the 10th block is read.
    src.on_read = Arc::new(move |n| {
        if n == 9 {
            s2.lock().unwrap().stop();
        }
    });
    let opts = BackupOptions {
        concurrency: 4,
        ..Default::default()
    };
    let started = Instant::now();
    let e = backup(&t, &src, &spec("b1"), &opts).await.unwrap_err();
    println!("failed after {:?}: {e}", started.elapsed());
    assert!(matches!(e, BackupError::Transport { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(60));

    server.lock().unwrap().restart();
    assert!(list(&t).await.unwrap().is_empty(), "nothing is listed");
    assert!(listed(&t, "manifests").await.is_empty());
    // The failed attempt's marker could not be removed (the server was down): GC keeps
    // every block until it goes stale, and says so.
    let report = gc(&t, &CoordOptions::default()).await.unwrap();
    assert_eq!(report.blocks_deleted, 0, "{report:?}");
    assert_eq!(report.running_backups, 1, "{report:?}");

    // The retry succeeds and reuses what the failed attempt uploaded.
    let retry = backup(&t, &MemImage::from_vec(v.clone()), &spec("b1"), &opts)
        .await
        .unwrap();
    println!("retry: {}", serde_json::to_string(&retry).unwrap());
    assert_eq!(retry.blocks_new + retry.blocks_reused, 40);
    assert!(retry.blocks_reused > 0, "{retry:?}");
    assert_eq!(list(&t).await.unwrap().len(), 1);
    assert_same(&restore_vec(&t, "b1", v.len()).await, &v);
}
