//! Starts the real `cairn replica serve` and drives it with the blocking client.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use cairn_replica::Client;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path, engine: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "replica",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--io-engine",
            engine,
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.split_whitespace().nth(2).unwrap().to_owned();
    Server { child, addr }
}

#[test]
fn write_read_round_trip_on_both_backends() {
    for engine in ["portable", "uring"] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), engine);
        let mut c = Client::connect(&server.addr, 1).unwrap();
        let st = c.hello("vol0", "r1", 1 << 20).unwrap();
        assert_eq!(st.size, 1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        c.write(4096, Bytes::from(data.clone()), false).unwrap();
        c.flush().unwrap();
        let back = c.read(4096, 8192).unwrap();
        assert_eq!(&back[..], &data[..], "{engine}");
    }
}
