//! `cairn csi` processes for tests and a CSI client over their Unix sockets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_csi::pb;
use tonic::transport::{Channel, Endpoint};

use super::{cairn_bin, wait_until};

/// A running `cairn csi` serving on `socket`, logging to `log`; killed when dropped.
pub struct CsiProc {
    child: std::process::Child,
    pub log: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub node: String,
}

impl CsiProc {
    /// Starts `cairn csi --mode MODE --node-id NODE` with its socket and state under `dir`,
    /// attaching volumes through nbdfuse + loop devices, and waits for the socket.
    pub fn start(dir: &Path, mode: &str, node: &str, meta: &str) -> CsiProc {
        CsiProc::start_attaching(dir, mode, node, meta, "fuse")
    }

    /// [`CsiProc::start`] with `--attach-mode ATTACH`.
    pub fn start_attaching(
        dir: &Path,
        mode: &str,
        node: &str,
        meta: &str,
        attach: &str,
    ) -> CsiProc {
        let socket = dir.join(format!("csi-{node}.sock"));
        let state_dir = dir.join(format!("csi-state-{node}"));
        let log = dir.join(format!("csi-{node}.log"));
        let child = Command::new(cairn_bin())
            .arg("csi")
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .args(["--mode", mode, "--node-id", node, "--meta", meta])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--attach-mode", attach, "--log", "info,cairn=debug"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cairn csi");
        let mut p = CsiProc {
            child,
            log,
            socket,
            state_dir,
            node: node.to_owned(),
        };
        wait_until(
            &format!("cairn csi on {node} to listen"),
            Duration::from_secs(30),
            || {
                assert!(
                    p.child.try_wait().unwrap().is_none(),
                    "cairn csi on {node} exited: {}",
                    p.log_text()
                );
                std::os::unix::net::UnixStream::connect(&p.socket).is_ok()
            },
        );
        p
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn channel(&self) -> Channel {
        match connect_unix(&self.socket).await {
            Ok(c) => c,
            Err(e) => panic!(
                "connect to cairn csi on {}: {e:?}; its log:\n{}",
                self.node,
                self.log_text()
            ),
        }
    }

    pub async fn identity(&self) -> pb::identity_client::IdentityClient<Channel> {
        pb::identity_client::IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> pb::controller_client::ControllerClient<Channel> {
        pb::controller_client::ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> pb::node_client::NodeClient<Channel> {
        pb::node_client::NodeClient::new(self.channel().await)
    }
}

impl Drop for CsiProc {
    /// Kills the process, then undoes whatever its node service left attached (a test
    /// that failed midway): the mounts under the test's directory, then each attachment
    /// (loop device, FUSE helper, state), so no test leaves devices behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Ok(attacher) = cairn_csi::host::attach::Attacher::new(&self.state_dir) else {
            return;
        };
        // Every mount under the test's directory (kubelet staging and pod paths, binds of
        // device nodes included), innermost first.
        let root = self
            .state_dir
            .parent()
            .unwrap_or(&self.state_dir)
            .to_owned();
        let mut mounts: Vec<PathBuf> = cairn_csi::host::mountinfo::read()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.mount_point)
            // Not the FUSE mounts of attachments: their detach below takes them down.
            .filter(|m| m.starts_with(&root) && !m.to_string_lossy().contains("/csi-state-"))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            let _ = cairn_csi::host::mount::unmount(&m);
        }
        for st in attacher.list().unwrap_or_default() {
            if let Err(e) = attacher.detach(&st.volume_id) {
                eprintln!("cleanup: detach {} on {}: {e}", st.volume_id, self.node);
            }
        }
    }
}

/// A gRPC channel over the Unix socket `path` (the URI's authority is never dialled).
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .timeout(Duration::from_secs(300))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// A mount capability (ext4 unless `fs` says otherwise) for one writer node.
pub fn mount_cap(fs: &str) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// A raw block capability for one writer node.
pub fn block_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Asserts `r` failed with `code` and, when given, a message containing `says`.
pub fn assert_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    says: &str,
    what: &str,
) {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(
                s.message().contains(says),
                "{what}: message {:?} should contain {says:?}",
                s.message()
            );
        }
    }
}
