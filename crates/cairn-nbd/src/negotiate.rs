//! Option haggling as a pure state machine: [`Negotiation::on_option`] takes one client option
//! (type and data, already read off the wire) and returns the encoded reply bytes plus what
//! the connection does next. The I/O loop in `handshake.rs` only carries that out.
//!
//! Guarantees: every option gets exactly one final reply (ACK or an error) except
//! `NBD_OPT_EXPORT_NAME`, which the protocol answers with the export size and flags or, for
//! an unknown export, a hard disconnect; option payloads are parsed with bounds checks and
//! a malformed payload earns `NBD_REP_ERR_INVALID`, never a panic; `base:allocation` is only
//! selectable after structured replies were negotiated, and is only in force for the export
//! the final `NBD_OPT_SET_META_CONTEXT` named.

use bytes::{BufMut, BytesMut};

use crate::proto::{
    FLAG_CAN_MULTI_CONN, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_HAS_FLAGS, FLAG_SEND_DF,
    FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_STRING_LEN, META_BASE_ALLOCATION,
    META_BASE_ALLOCATION_ID, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META_CONTEXT, OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT,
    REP_SERVER,
};
use crate::NbdError;

/// What negotiation needs to know about one export, sampled when the connection starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportMeta {
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Minimum and preferred block size.
    pub block: u32,
    /// Maximum block size (a multiple of `block`).
    pub max_io: u32,
    pub multi_conn: bool,
}

/// What the connection does after sending a step's reply.
#[derive(Debug)]
pub enum Next {
    /// Read the next option.
    Continue,
    /// Enter transmission with `exports[export]`.
    Transmit { export: usize },
    /// The client aborted; close cleanly.
    Abort,
    /// Close the connection with this error (the protocol leaves no way to reply).
    Fail(NbdError),
}

/// One option's outcome: bytes to send (possibly none), then [`Next`].
#[derive(Debug)]
pub struct Step {
    pub reply: BytesMut,
    pub next: Next,
}

/// Negotiation state of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export whose `base:allocation` the last SET_META_CONTEXT selected.
    meta: Option<usize>,
}

impl Negotiation {
    /// Starts from the client flags; unknown flags mean the client speaks something else and
    /// the spec requires dropping the connection.
    pub fn new(client_flags: u32) -> Result<Negotiation, NbdError> {
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(NbdError::UnknownClientFlags(client_flags));
        }
        Ok(Negotiation {
            fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta: None,
        })
    }

    /// Fixed newstyle negotiated (otherwise only `NBD_OPT_EXPORT_NAME` is allowed).
    pub fn fixed(&self) -> bool {
        self.fixed
    }

    /// Structured replies negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// `base:allocation` is selected for `exports[export]`.
    pub fn base_allocation(&self, export: usize) -> bool {
        self.structured && self.meta == Some(export)
    }

    /// Transmission flags for an export, given what has been negotiated so far.
    pub fn transmission_flags(&self, e: &ExportMeta) -> u16 {
        let mut f = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES;
        if self.structured {
            // Reads always go out as one OFFSET_DATA chunk, so DF is honoured trivially.
            f |= FLAG_SEND_DF;
        }
        if e.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// The reply to an option whose data the I/O layer refused to read in full.
    pub fn too_big(&self, opt: u32) -> Step {
        let mut reply = BytesMut::new();
        rep(&mut reply, opt, REP_ERR_TOO_BIG, b"option data too long");
        Step {
            reply,
            next: Next::Continue,
        }
    }

    /// Handles one option.
    pub fn on_option(&mut self, exports: &[ExportMeta], opt: u32, data: &[u8]) -> Step {
        let mut reply = BytesMut::new();
        if !self.fixed && opt != OPT_EXPORT_NAME {
            return Step {
                reply,
                next: Next::Fail(NbdError::NotFixedNewstyle { option: opt }),
            };
        }
        let next = match opt {
            OPT_EXPORT_NAME => self.export_name(exports, data, &mut reply),
            OPT_ABORT => {
                rep(&mut reply, opt, REP_ACK, b"");
                Next::Abort
            }
            OPT_LIST => {
                if data.is_empty() {
                    for e in exports {
                        let mut d = BytesMut::new();
                        put_str32(&mut d, e.name.as_bytes());
                        d.put_slice(e.description.as_bytes());
                        rep(&mut reply, opt, REP_SERVER, &d);
                    }
                    rep(&mut reply, opt, REP_ACK, b"");
                } else {
                    rep(&mut reply, opt, REP_ERR_INVALID, b"LIST takes no data");
                }
                Next::Continue
            }
            OPT_INFO | OPT_GO => self.info_or_go(exports, opt, data, &mut reply),
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    rep(&mut reply, opt, REP_ACK, b"");
                } else {
                    rep(
                        &mut reply,
                        opt,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    );
                }
                Next::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(exports, opt, data, &mut reply);
                Next::Continue
            }
            _ => {
                rep(&mut reply, opt, REP_ERR_UNSUP, b"option not supported");
                Next::Continue
            }
        };
        Step { reply, next }
    }

    fn export_name(&mut self, exports: &[ExportMeta], data: &[u8], reply: &mut BytesMut) -> Next {
        let Some(idx) = find(exports, data) else {
            return Next::Fail(NbdError::UnknownExport(
                String::from_utf8_lossy(&data[..data.len().min(MAX_STRING_LEN)]).into_owned(),
            ));
        };
        let e = &exports[idx];
        reply.put_u64(e.size);
        reply.put_u16(self.transmission_flags(e));
        if !self.no_zeroes {
            reply.put_bytes(0, 124);
        }
        Next::Transmit { export: idx }
    }

    fn info_or_go(
        &mut self,
        exports: &[ExportMeta],
        opt: u32,
        data: &[u8],
        reply: &mut BytesMut,
    ) -> Next {
        let Some(q) = parse_export_query(data) else {
            rep(reply, opt, REP_ERR_INVALID, b"malformed INFO/GO request");
            return Next::Continue;
        };
        let Some(idx) = find(exports, q.name) else {
            rep(reply, opt, REP_ERR_UNKNOWN, b"export not found");
            return Next::Continue;
        };
        let e = &exports[idx];
        let mut d = BytesMut::new();
        d.put_u16(INFO_EXPORT);
        d.put_u64(e.size);
        d.put_u16(self.transmission_flags(e));
        rep(reply, opt, REP_INFO, &d);
        // Sent whether or not asked for: the server enforces non-default constraints.
        let mut d = BytesMut::new();
        d.put_u16(INFO_BLOCK_SIZE);
        d.put_u32(e.block);
        d.put_u32(e.block.max(512));
        d.put_u32(e.max_io);
        rep(reply, opt, REP_INFO, &d);
        if q.infos.contains(&INFO_NAME) {
            let mut d = BytesMut::new();
            d.put_u16(INFO_NAME);
            d.put_slice(e.name.as_bytes());
            rep(reply, opt, REP_INFO, &d);
        }
        if q.infos.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut d = BytesMut::new();
            d.put_u16(INFO_DESCRIPTION);
            d.put_slice(e.description.as_bytes());
            rep(reply, opt, REP_INFO, &d);
        }
        rep(reply, opt, REP_ACK, b"");
        if opt == OPT_GO {
            Next::Transmit { export: idx }
        } else {
            Next::Continue
        }
    }

    fn meta_context(
        &mut self,
        exports: &[ExportMeta],
        opt: u32,
        data: &[u8],
        reply: &mut BytesMut,
    ) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the previous selection even when it fails.
            self.meta = None;
        }
        if !self.structured {
            rep(
                reply,
                opt,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let Some(q) = parse_meta_query(data) else {
            rep(
                reply,
                opt,
                REP_ERR_INVALID,
                b"malformed meta context request",
            );
            return;
        };
        let Some(idx) = find(exports, q.name) else {
            rep(reply, opt, REP_ERR_UNKNOWN, b"export not found");
            return;
        };
        let base_allocation = META_BASE_ALLOCATION.as_bytes();
        let matched = if set {
            q.queries.contains(&base_allocation)
        } else {
            q.queries.is_empty()
                || q.queries
                    .iter()
                    .any(|&s| s == base_allocation || s == b"base:")
        };
        if matched {
            // LIST replies carry a reserved id of zero.
            let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
            let mut d = BytesMut::new();
            d.put_u32(id);
            d.put_slice(base_allocation);
            rep(reply, opt, REP_META_CONTEXT, &d);
            if set {
                self.meta = Some(idx);
            }
        }
        rep(reply, opt, REP_ACK, b"");
    }
}

/// Appends one option reply.
fn rep(out: &mut BytesMut, opt: u32, kind: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(opt);
    out.put_u32(kind);
    put_str32(out, data);
}

/// Appends a 32-bit length and the bytes (data is bounded by the option size limits).
fn put_str32(out: &mut BytesMut, data: &[u8]) {
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.put_slice(data);
}

/// The export a client names: an exact match, or the first export for the empty name.
fn find(exports: &[ExportMeta], name: &[u8]) -> Option<usize> {
    exports
        .iter()
        .position(|e| e.name.as_bytes() == name)
        .or_else(|| (name.is_empty() && !exports.is_empty()).then_some(0))
}

/// Bounds-checked reader over an option's data.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit length then that many bytes, at most the protocol's string limit.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING_LEN {
            return None;
        }
        self.take(len)
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery<'a> {
    pub name: &'a [u8],
    pub infos: Vec<u16>,
}

/// Parses INFO/GO data; `None` if it is malformed (lengths disagree, trailing bytes).
pub fn parse_export_query(data: &[u8]) -> Option<ExportQuery<'_>> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let infos = (0..n).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
    c.0.is_empty().then_some(ExportQuery { name, infos })
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery<'a> {
    pub name: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

/// Parses meta context data; `None` if it is malformed.
pub fn parse_meta_query(data: &[u8]) -> Option<MetaQuery<'_>> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    // Each query takes at least 4 bytes, which bounds the loop by the data length.
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.0.is_empty().then_some(MetaQuery { name, queries })
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
