//! Backup targets: `s3://bucket/prefix` through object_store's S3 client and
//! `file:///dir` through its local file system store.
//!
//! Configuration is explicit: [`S3Config`] carries endpoint, region and credentials; the
//! standard AWS variables are read only when the caller asks for them with
//! [`S3Config::with_env_defaults`], and only fill fields the caller left empty.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::{BackupError, Result};

/// S3 connection settings. Empty fields use the AWS defaults of the object_store client.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000`. When set, path-style addressing is used.
    pub endpoint: Option<String>,
    /// Region; `us-east-1` when unset.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
    /// Retries of a failed request (default 3).
    pub max_retries: Option<usize>,
    /// Total time a request may spend retrying (default 30 s).
    pub retry_timeout: Option<Duration>,
    /// Timeout of one request (default 60 s).
    pub request_timeout: Option<Duration>,
}

impl S3Config {
    /// Fills the fields left empty from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN, AWS_REGION (or AWS_DEFAULT_REGION) and AWS_ENDPOINT_URL.
    pub fn with_env_defaults(self) -> Self {
        self.with_defaults_from(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Like [`S3Config::with_env_defaults`] with a custom variable lookup (for tests).
    pub fn with_defaults_from(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        fn fill(slot: &mut Option<String>, v: Option<String>) {
            if slot.is_none() {
                *slot = v;
            }
        }
        fill(&mut self.access_key_id, var("AWS_ACCESS_KEY_ID"));
        fill(&mut self.secret_access_key, var("AWS_SECRET_ACCESS_KEY"));
        fill(&mut self.session_token, var("AWS_SESSION_TOKEN"));
        fill(
            &mut self.region,
            var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
        );
        fill(&mut self.endpoint, var("AWS_ENDPOINT_URL"));
        self
    }
}

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// `s3://bucket/prefix`
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
        prefix: String,
    },
    /// `file:///dir`
    File {
        /// Absolute directory path.
        dir: std::path::PathBuf,
    },
}

/// Parses `s3://bucket[/prefix]` or `file:///absolute/dir`.
pub fn parse_target(url: &str) -> Result<TargetUrl> {
    let bad = |reason: &str| BackupError::InvalidTarget {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name (expected s3://bucket/prefix)"));
        }
        let bucket_ok = bucket.len() >= 3
            && bucket.len() <= 63
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(bad(
                "bucket names are 3-63 characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit",
            ));
        }
        if url.contains(['?', '#']) {
            return Err(bad("query strings and fragments are not supported"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|s| s.is_empty() && !prefix.is_empty())
            || prefix.split('/').any(|s| s == "." || s == "..")
        {
            return Err(bad("the prefix has an empty, '.' or '..' path segment"));
        }
        return Ok(TargetUrl::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        });
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad("file targets need an absolute path: file:///dir"));
        }
        if rest.contains(['?', '#']) {
            return Err(bad("query strings and fragments are not supported"));
        }
        return Ok(TargetUrl::File { dir: rest.into() });
    }
    match url.split_once("://") {
        Some((scheme, _)) => Err(bad(&format!(
            "unsupported scheme {scheme:?} (use s3:// or file://)"
        ))),
        None => Err(bad("not a URL (use s3://bucket/prefix or file:///dir)")),
    }
}

/// An opened target: an object store and the key prefix all objects live under.
#[derive(Clone)]
pub struct Target {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: Path,
    display: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.display)
    }
}

impl Target {
    /// Opens a target URL. `s3` settings apply to `s3://` URLs only. A `file://`
    /// directory is created if missing.
    pub fn open(url: &str, s3: &S3Config) -> Result<Target> {
        match parse_target(url)? {
            TargetUrl::S3 { bucket, prefix } => {
                let retry = RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(5),
                        base: 2.0,
                    },
                    max_retries: s3.max_retries.unwrap_or(3),
                    retry_timeout: s3.retry_timeout.unwrap_or(Duration::from_secs(30)),
                };
                let mut options = ClientOptions::new()
                    .with_timeout(s3.request_timeout.unwrap_or(Duration::from_secs(60)))
                    .with_connect_timeout(Duration::from_secs(5));
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(&bucket)
                    .with_region(s3.region.as_deref().unwrap_or("us-east-1"))
                    .with_retry(retry);
                if let Some(ep) = &s3.endpoint {
                    if ep.starts_with("http://") {
                        options = options.with_allow_http(true);
                    }
                    b = b
                        .with_endpoint(ep.trim_end_matches('/'))
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(k) = &s3.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = &s3.secret_access_key {
                    b = b.with_secret_access_key(k);
                }
                if let Some(t) = &s3.session_token {
                    b = b.with_token(t);
                }
                let store = b.with_client_options(options).build().map_err(|e| {
                    BackupError::InvalidTarget {
                        url: url.to_string(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(Target::from_store(Arc::new(store), &prefix, url))
            }
            TargetUrl::File { dir } => {
                std::fs::create_dir_all(&dir).map_err(|e| BackupError::InvalidTarget {
                    url: url.to_string(),
                    reason: format!("cannot create {}: {e}", dir.display()),
                })?;
                let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| {
                    BackupError::InvalidTarget {
                        url: url.to_string(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(Target::from_store(Arc::new(store), "", url))
            }
        }
    }

    /// Wraps any object store (e.g. `object_store::memory::InMemory` in tests).
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, display: &str) -> Target {
        Target {
            store,
            prefix: Path::from(prefix.trim_matches('/')),
            display: display.to_string(),
        }
    }

    /// The object store underneath (for tests and tools).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub(crate) fn key(&self, rel: &str) -> Path {
        if self.prefix.as_ref().is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Key of a block object, `blocks/<first two hex digits>/<64 hex digits>`.
    pub fn block_key(&self, hash: &blake3::Hash) -> Path {
        let hex = hash.to_hex();
        self.key(&format!("blocks/{}/{}", &hex[..2], hex))
    }

    /// Key of a manifest, `manifests/<name>.json`.
    pub fn manifest_key(&self, name: &str) -> Path {
        self.key(&format!("manifests/{name}.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_urls() {
        assert_eq!(
            parse_target("s3://my-bucket/a/b/").unwrap(),
            TargetUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            parse_target("s3://bkt").unwrap(),
            TargetUrl::S3 {
                bucket: "bkt".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            parse_target("file:///tmp/x").unwrap(),
            TargetUrl::File {
                dir: "/tmp/x".into()
            }
        );
    }

    #[test]
    fn rejects_bad_urls_with_reasons() {
        for (url, needle) in [
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("s3://UPPER/x", "bucket names"),
            ("s3://ab", "bucket names"),
            ("s3://bkt/a//b", "empty"),
            ("s3://bkt/a/../b", "'..'"),
            ("s3://bkt/a?x=1", "query"),
            ("file://relative/dir", "absolute"),
            ("gs://bkt/x", "unsupported scheme \"gs\""),
            ("/tmp/x", "not a URL"),
        ] {
            let e = parse_target(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn opens_s3_and_file_targets() {
        let cfg = S3Config {
            endpoint: Some("http://127.0.0.1:9/".into()),
            access_key_id: Some("AK".into()),
            secret_access_key: Some("SK".into()),
            ..Default::default()
        };
        let t = Target::open("s3://bkt/a/b", &cfg).unwrap();
        let h = blake3::hash(b"x");
        let key = t.block_key(&h).to_string();
        assert!(key.starts_with("a/b/blocks/") && key.ends_with(&h.to_hex().to_string()));
        assert_eq!(t.manifest_key("n").to_string(), "a/b/manifests/n.json");
        let e = Target::open("file://rel/dir", &cfg).unwrap_err();
        assert!(matches!(e, BackupError::InvalidTarget { .. }), "{e}");
        let dir = std::env::temp_dir().join(format!("cairn-backup-open-{}", std::process::id()));
        let t = Target::open(&format!("file://{}", dir.display()), &cfg).unwrap();
        assert_eq!(t.manifest_key("n").to_string(), "manifests/n.json");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn env_fills_only_empty_fields() {
        let c = S3Config {
            region: Some("eu-west-1".into()),
            ..Default::default()
        }
        .with_defaults_from(|k| match k {
            "AWS_REGION" => Some("us-west-2".into()),
            "AWS_ACCESS_KEY_ID" => Some("AK".into()),
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:1".into()),
            _ => None,
        });
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.access_key_id.as_deref(), Some("AK"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(c.secret_access_key, None);
    }
}
