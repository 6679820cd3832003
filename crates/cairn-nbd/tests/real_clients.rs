//! End-to-end tests with real NBD clients (libnbd's nbdinfo, nbdcopy and nbdsh; qemu-io
//! and qemu-img) run as subprocesses against an `NbdServer` on a loopback port. A test whose
//! tool is not installed prints SKIP and passes (`apt-get install -y libnbd-bin nbdkit
//! python3-libnbd`; qemu-utils for qemu-io/qemu-img).

mod common;

use std::process::{Command, Output};
use std::sync::Arc;

use cairn_blockdev::{BlockDevice, MemDevice};
use cairn_nbd::NbdServer;
use serde_json::Value;

const SIZE: u64 = 16 << 20;

/// A server on 127.0.0.1 running on its own runtime until dropped.
struct Running {
    dev: Arc<MemDevice>,
    port: u16,
    _rt: tokio::runtime::Runtime,
}

impl Running {
    fn start(size: u64) -> Running {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dev = Arc::new(MemDevice::new(size));
        let mut srv = NbdServer::new();
        srv.add_export("disk", "cairn test disk", Arc::clone(&dev));
        let srv = Arc::new(srv);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(srv.serve(listener));
        Running { dev, port, _rt: rt }
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/disk", self.port)
    }
}

/// Runs a tool (with /usr/bin first in PATH, for nbdsh's Python module) or returns `None`
/// after printing SKIP if it is not installed.
fn run(tool: &str, args: &[&str]) -> Option<Output> {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    match Command::new(tool).args(args).env("PATH", path).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("SKIP: {tool} is not installed");
            None
        }
        Err(e) => panic!("running {tool}: {e}"),
    }
}

/// Like [`run`], asserting success; returns stdout.
fn run_ok(tool: &str, args: &[&str]) -> Option<String> {
    let out = run(tool, args)?;
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        })
        .collect()
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn nbdinfo_json_shows_size_block_sizes_and_contexts() {
    let s = Running::start(SIZE);
    let Some(out) = run_ok("nbdinfo", &["--json", &s.uri()]) else {
        return;
    };
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["description"], "cairn test disk");
    assert_eq!(u64_field(e, "export-size"), SIZE);
    assert_eq!(u64_field(e, "block_size_minimum"), 4096);
    assert_eq!(u64_field(e, "block_size_preferred"), 4096);
    assert_eq!(
        u64_field(e, "block_size_maximum"),
        u64::from(s.dev.max_io())
    );
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_df",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_fast_zero"], false);
}

#[test]
fn nbdinfo_unknown_export_is_refused() {
    let s = Running::start(SIZE);
    let uri = format!("nbd://127.0.0.1:{}/nope", s.port);
    let Some(out) = run("nbdinfo", &[&uri]) else {
        return;
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // libnbd shows NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(
        err.contains("opt_go") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn nbdinfo_lists_exports() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut srv = NbdServer::new();
    srv.add_export("one", "first", Arc::new(MemDevice::new(1 << 20)));
    srv.add_export("two", "second", Arc::new(MemDevice::new(2 << 20)));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(Arc::new(srv).serve(listener));
    let uri = format!("nbd://127.0.0.1:{port}");
    let Some(out) = run_ok("nbdinfo", &["--list", "--json", &uri]) else {
        return;
    };
    let v: Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<_> = exports.iter().map(|e| e["export-name"].clone()).collect();
    assert_eq!(names, vec!["one", "two"]);
    assert_eq!(u64_field(&exports[1], "export-size"), 2 << 20);
    assert_eq!(exports[0]["description"], "first");
}

#[test]
fn qemu_io_writes_and_verifies_a_pattern() {
    let s = Running::start(SIZE);
    let Some(out) = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -f -P 0x11 1M 8k",
            "-c",
            "read -P 0 64k 4k",
            "-c",
            "write -z 0 4k",
            "-c",
            "discard 8k 8k",
            "-c",
            "read -P 0 0 4k",
            "-c",
            "read -P 0xab 4k 4k",
            &s.uri(),
        ],
    ) else {
        return;
    };
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("wrote ").count(), 3, "{out}");
    assert_eq!(out.matches("discard ").count(), 1, "{out}");
    assert_eq!(out.matches("read ").count(), 4, "{out}");
    let data = s.dev.contents();
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..8192].iter().all(|&b| b == 0xab));
    assert!(data[8192..16384].iter().all(|&b| b == 0));
    assert!(data[16384..64 << 10].iter().all(|&b| b == 0xab));
    assert!(data[1 << 20..(1 << 20) + 8192].iter().all(|&b| b == 0x11));
    assert!(data[64 << 10..1 << 20].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_unaligned_write_is_read_modify_written() {
    let s = Running::start(SIZE);
    // qemu honours the advertised 4096-byte minimum block size: it reads the block, patches
    // 512 bytes and writes the whole block back.
    let Some(out) = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 0 4k",
            "-c",
            "write -P 0xcd 512 512",
            "-c",
            "read -P 0xcd 512 512",
            "-c",
            "read -P 0x22 0 512",
            "-c",
            "read -P 0x22 1k 3k",
            &s.uri(),
        ],
    ) else {
        return;
    };
    assert!(!out.contains("fail"), "{out}");
    let data = s.dev.contents();
    assert!(data[..512].iter().all(|&b| b == 0x22));
    assert!(data[512..1024].iter().all(|&b| b == 0xcd));
    assert!(data[1024..4096].iter().all(|&b| b == 0x22));
}

#[test]
fn nbdcopy_in_and_out_with_multi_conn() {
    let size = 8 << 20;
    let s = Running::start(size);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = pseudo_random(8 << 20, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&src, &data).unwrap();
    let (src_s, dst_s) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let Some(out) = run(
        "nbdcopy",
        &["--verbose", "--flush", "--connections=4", src_s, &s.uri()],
    ) else {
        return;
    };
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nbdcopy failed: {log}");
    let conns: std::collections::HashSet<&str> = log
        .lines()
        .filter(|l| l.contains("nbd_connect_uri: enter"))
        .filter_map(|l| l.split(':').nth(2))
        .collect();
    // Without CAN_MULTI_CONN nbdcopy would use one connection; with it, up to 4, capped at
    // its thread count (the number of CPUs).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        conns.len() >= cpus.min(2),
        "connections to the destination: {conns:?}"
    );
    assert!(s.dev.contents() == data, "export differs from the source");
    assert!(s.dev.flushes() > 0);
    run_ok("nbdcopy", &[&s.uri(), dst_s]).unwrap();
    let copied = std::fs::read(&dst).unwrap();
    assert_eq!(copied.len(), data.len());
    assert!(copied == data, "copy out differs from the source");
}

/// Writes `len` bytes of `byte` at `offset` straight to the device.
fn poke(s: &Running, offset: u64, len: usize, byte: u8) {
    s._rt
        .block_on(s.dev.write(offset, vec![byte; len].into(), false))
        .unwrap();
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    let s = Running::start(SIZE);
    poke(&s, 1 << 20, 64 << 10, 0x5a);
    poke(&s, 4 << 20, 4096, 0x5a);
    let Some(out) = run_ok("nbdinfo", &["--map", "--json", &s.uri()]) else {
        return;
    };
    let v: Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                u64_field(e, "offset"),
                u64_field(e, "length"),
                u64_field(e, "type"),
            )
        })
        .collect();
    let m = 1 << 20;
    assert_eq!(
        got,
        vec![
            (0, m, 3),
            (m, 64 << 10, 0),
            (m + (64 << 10), 3 * m - (64 << 10), 3),
            (4 * m, 4096, 0),
            (4 * m + 4096, SIZE - 4 * m - 4096, 3),
        ]
    );
}

#[test]
fn qemu_img_map_matches_allocation() {
    let s = Running::start(SIZE);
    poke(&s, 2 << 20, 128 << 10, 1);
    let Some(out) = run_ok("qemu-img", &["map", "-f", "raw", "--output=json", &s.uri()]) else {
        return;
    };
    let v: Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(u64, u64, bool, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let b = |k: &str| e[k].as_bool().unwrap();
            (
                u64_field(e, "start"),
                u64_field(e, "length"),
                b("data"),
                b("zero"),
            )
        })
        .collect();
    let m = 2 << 20;
    let len = 128 << 10;
    assert_eq!(
        got,
        vec![
            (0, m, false, true),
            (m, len, true, false),
            (m + len, SIZE - m - len, false, true),
        ]
    );
}

#[test]
fn nbdsh_sees_exact_errors_and_keeps_the_connection() {
    let s = Running::start(SIZE);
    // Strict mode off so libnbd sends what its own checks would refuse.
    let script = r#"
import errno
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.can_multi_conn() and h.can_fua() and h.can_zero()
assert h.can_meta_context("base:allocation")
h.set_strict_mode(0)
def expect(fn, name):
    try:
        fn()
    except nbd.Error as e:
        # libnbd reports the errno as its name (older) or its number.
        assert e.errno in (name, getattr(errno, name)), (e.errno, e.string)
    else:
        raise AssertionError("no error")
h.pwrite(b"\x33" * 4096, 0)
expect(lambda: h.pwrite(b"x" * 512, 512), "EINVAL")
expect(lambda: h.pread(512, 512), "EINVAL")
expect(lambda: h.pwrite(b"x" * 4096, h.get_size()), "ENOSPC")
expect(lambda: h.zero(4096, h.get_size()), "ENOSPC")
expect(lambda: h.pread(4096, h.get_size()), "EINVAL")
expect(lambda: h.trim(4096, h.get_size()), "EINVAL")
assert h.pread(4096, 0) == b"\x33" * 4096
seen = []
def extents(ctx, offset, entries, err):
    seen.append((ctx, offset, list(entries)))
    return 0
h.block_status(65536, 0, extents, nbd.CMD_FLAG_REQ_ONE)
assert seen == [("base:allocation", 0, [4096, 0])], seen
seen.clear()
h.block_status(65536, 0, extents)
assert seen == [("base:allocation", 0, [4096, 0, 61440, 3])], seen
h.flush()
print("ok")
"#;
    let Some(out) = run_ok(
        "nbdsh",
        &["--base-allocation", "-u", &s.uri(), "-c", script],
    ) else {
        return;
    };
    assert_eq!(out.trim(), "ok");
}
