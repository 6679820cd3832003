//! An S3 server for the backup tests: s3s-fs (0.14.1, installed by `tests/run`) on a free
//! port of 127.0.0.1 in the calling thread's network namespace, serving a temp directory
//! (each bucket is a folder in it, each object a plain file at `ROOT/BUCKET/KEY`), so a test
//! can count, read and corrupt objects directly. Killed (SIGKILL) and reaped on drop.
//!
//! Assumes the caller entered its private network namespace first: the port is free there,
//! and a restart binds it again.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{have_tool, wait_until};

/// Access key s3s-fs is started with.
pub const S3_ACCESS_KEY: &str = "AKTEST";
/// Secret key s3s-fs is started with.
pub const S3_SECRET_KEY: &str = "SKTEST";
/// Region the clients name (s3s-fs accepts any).
pub const S3_REGION: &str = "us-east-1";

/// A running (or killed, to be restarted) s3s-fs.
pub struct S3Server {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The directory it serves.
    pub root: PathBuf,
    /// The bucket created for the test (a folder under `root`).
    pub bucket: String,
    log: PathBuf,
}

impl S3Server {
    /// Starts s3s-fs on `root` with `bucket` created, or returns `None` after printing
    /// `SKIP: ...` when it is not installed.
    pub fn start(root: &Path, bucket: &str) -> Option<S3Server> {
        if !have_tool("s3s-fs") {
            println!(
                "SKIP: s3s-fs is not on PATH (cargo install s3s-fs@0.14.1 --locked --features binary)"
            );
            return None;
        }
        std::fs::create_dir_all(root.join(bucket)).expect("create the bucket directory");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut s = S3Server {
            child: None,
            port,
            root: root.to_owned(),
            bucket: bucket.to_owned(),
            log: super::log_path(root),
        };
        s.restart();
        Some(s)
    }

    /// (Re)starts the server on the same port and directory; returns once it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the s3s-fs log");
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn s3s-fs");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_until(
            &format!("s3s-fs to accept on {addr}"),
            Duration::from_secs(20),
            || {
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().expect("wait s3s-fs"));
                assert!(
                    exited.is_none(),
                    "s3s-fs exited: {exited:?}\n{}",
                    self.log()
                );
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            },
        );
    }

    /// The server's pid (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The directory holding the objects under `prefix`.
    pub fn dir(&self, prefix: &str) -> PathBuf {
        self.root.join(&self.bucket).join(prefix)
    }

    /// Sets the AWS environment variables that point a client at this server.
    pub fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .env("AWS_REGION", S3_REGION)
            .env("AWS_ENDPOINT_URL", self.endpoint())
    }

    /// The same settings as `cairn backup` flags.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-region".into(),
            S3_REGION.into(),
            "--s3-access-key-id".into(),
            S3_ACCESS_KEY.into(),
            "--s3-secret-access-key".into(),
            S3_SECRET_KEY.into(),
        ]
    }

    /// Writes the same settings as a `--target-config` TOML file at `path`.
    pub fn write_config(&self, path: &Path) {
        let text = format!(
            "endpoint = \"{}\"\nregion = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\nsecret_access_key = \"{S3_SECRET_KEY}\"\n",
            self.endpoint()
        );
        std::fs::write(path, text).expect("write the target config");
    }

    /// The server's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("--- last lines of the s3s-fs log {}:", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
